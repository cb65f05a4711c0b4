//! Connection strings: libpq URLs (`postgres://…`) and key=value DSNs, and
//! connections given in parts ([`ConnectionParts`]).
//!
//! tokio-postgres' [`Config`](tokio_postgres::Config) parses both forms,
//! but knows neither `sslmode=verify-ca`, `verify-full` nor `sslrootcert`,
//! so those are taken out here first (one key=value tokenizer, libpq's
//! quoting; URL query pairs decoded by `percent-encoding`) and handled by
//! module `tls`. Everything this module reports is free of the password:
//! [`Database`]'s `Debug` redacts it, and the driver's parse errors are
//! reworded here (they may name an option, never a value) and scrubbed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::Error;

/// The application name our sessions announce unless the DSN or the caller
/// says otherwise; it is how DBAs (and `lockHolder`) recognise us.
pub(crate) const DEFAULT_APPLICATION_NAME: &str = "usage-backfill";
/// Connect timeout unless the DSN sets `connect_timeout`.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How TLS is used, with libpq's meanings.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, strum::IntoStaticStr,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, no certificate check.
    Prefer,
    /// TLS required, no certificate check (a CA bundle, if given, upgrades
    /// this to verify-ca, as libpq does with a root certificate file).
    Require,
    /// TLS required, the server certificate must chain to the CA bundle.
    VerifyCa,
    /// As verify-ca, and the certificate must name the host connected to.
    VerifyFull,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl FromStr for TlsMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "disable" => TlsMode::Disable,
            // libpq's `allow` tries plain first; preferring TLS is the safer
            // reading and still connects to the same servers.
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                let shown: String = other.chars().take(20).collect();
                return Err(Error::InvalidConnectionString(format!(
                    "unknown sslmode {shown:?} (use disable, prefer, require, verify-ca or verify-full)"
                )));
            }
        })
    }
}

/// A parsed, validated connection target. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    pub(crate) config: tokio_postgres::Config,
    /// Resolved TLS mode: explicit override, else the DSN's sslmode, else prefer.
    pub tls_mode: TlsMode,
    /// PEM CA bundle for verify-ca / verify-full, given as bytes.
    pub(crate) ca_pem: Option<Vec<u8>>,
    /// `sslrootcert` from the DSN, read at connect time.
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) connect_timeout: Duration,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("target", &self.describe())
            .field("tls_mode", &self.tls_mode)
            .field("ca_pem", &self.ca_pem.as_ref().map(|b| b.len()))
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Database {
    /// Parses a libpq URL or key=value DSN.
    pub fn parse(dsn: &str) -> Result<Self, Error> {
        let dsn = dsn.trim();
        if dsn.is_empty() {
            return Err(Error::InvalidConnectionString(
                "the connection string is empty".into(),
            ));
        }
        let parts = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
            split_url(dsn)?
        } else if dsn.contains('=') {
            split_key_value(dsn)?
        } else {
            return Err(Error::InvalidConnectionString(
                "expected a postgres:// URL or key=value pairs".into(),
            ));
        };
        let password = parts.password.clone();
        let scrub = |msg: String| match &password {
            Some(p) if !p.is_empty() => msg.replace(p.as_str(), "****"),
            _ => msg,
        };
        let mut config = tokio_postgres::Config::from_str(&parts.rest)
            .map_err(|e| Error::InvalidConnectionString(scrub(driver_parse_error(&e))))?;
        if config.get_hosts().is_empty() {
            // libpq defaults to the local socket; we only support what we can
            // test, so say it instead of guessing a socket path.
            return Err(Error::InvalidConnectionString(
                "no host given (set host=… or postgres://HOST/…)".into(),
            ));
        }
        if config.get_application_name().is_none() {
            config.application_name(DEFAULT_APPLICATION_NAME);
        }
        let connect_timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        config.connect_timeout(connect_timeout);
        let tls_mode = match parts.sslmode.as_deref() {
            Some(m) => m.parse()?,
            None => TlsMode::Prefer,
        };
        Ok(Database {
            config,
            tls_mode,
            ca_pem: None,
            ca_file: parts.sslrootcert.map(PathBuf::from),
            connect_timeout,
        })
    }

    /// A connection given field by field, as when a chart keeps only the
    /// password in a Secret. The password goes to the driver as bytes and
    /// is never formatted into a string (no DSN is built). TLS mode prefer,
    /// as for a DSN without sslmode.
    pub fn from_parts(parts: ConnectionParts) -> Result<Self, Error> {
        let host = parts.host.trim();
        if host.is_empty() {
            return Err(Error::InvalidConnectionString("no host given".into()));
        }
        if host.contains(|c: char| c.is_whitespace() || c == ',') {
            let shown: String = host.chars().take(60).collect();
            return Err(Error::InvalidConnectionString(format!(
                "host {shown:?} is not one host name or address"
            )));
        }
        let user = parts.user.trim();
        if user.is_empty() {
            return Err(Error::InvalidConnectionString("no user given".into()));
        }
        let port = parts.port.unwrap_or(5432);
        if port == 0 {
            return Err(Error::InvalidConnectionString(
                "port must be from 1 to 65535".into(),
            ));
        }
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(port)
            .user(user)
            .application_name(DEFAULT_APPLICATION_NAME)
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        // libpq's default database is the user's name.
        match parts.dbname.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => config.dbname(name),
            _ => config.dbname(user),
        };
        if let Some(password) = &parts.password
            && !password.0.is_empty()
        {
            config.password(password.0.as_slice());
        }
        Ok(Database {
            config,
            tls_mode: TlsMode::Prefer,
            ca_pem: None,
            ca_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        })
    }

    /// Overrides the TLS mode (e.g. from `spec.database.tls.mode`).
    pub fn with_tls_mode(mut self, mode: TlsMode) -> Self {
        self.tls_mode = mode;
        self
    }

    /// Sets the CA bundle (PEM) used by verify-ca / verify-full.
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    pub fn with_application_name(mut self, name: &str) -> Self {
        self.config.application_name(name);
        self
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self.config.connect_timeout(timeout);
        self
    }

    /// Whether the DSN names a CA file (`sslrootcert`): a path on this
    /// machine, which the controller refuses.
    pub fn names_ca_file(&self) -> bool {
        self.ca_file.is_some()
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    pub fn application_name(&self) -> &str {
        self.config
            .get_application_name()
            .unwrap_or(DEFAULT_APPLICATION_NAME)
    }

    /// `user@host:port/dbname`, for messages: never the password.
    pub fn describe(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{}:{}/{}",
            self.config.get_user().unwrap_or("?"),
            host,
            port,
            self.config
                .get_dbname()
                .or(self.config.get_user())
                .unwrap_or("?")
        )
    }

    /// `host:port[,host:port…]/dbname`: where sessions go, without the user
    /// or the password. The dbname is as the server resolves it (the
    /// user's name when none is given).
    pub fn target(&self) -> String {
        let ports = self.config.get_ports();
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                // One port for every host, or one per host (libpq's rule).
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect();
        let dbname = self
            .config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("?");
        format!("{}/{dbname}", hosts.join(","))
    }

    /// The password, only to scrub it out of server and driver messages.
    pub(crate) fn password(&self) -> Option<String> {
        self.config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }
}

/// A connection in parts: host, port (default 5432), database (default:
/// the user's name), user, password.
#[derive(Debug, Clone, Default)]
pub struct ConnectionParts {
    pub host: String,
    pub port: Option<u16>,
    pub dbname: Option<String>,
    pub user: String,
    pub password: Option<Password>,
}

/// A password as the bytes it is. Its `Debug` shows nothing of it and it
/// has no `Display`: it reaches the driver and nothing else.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Vec<u8>);

impl Password {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Password(bytes.into())
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(****)")
    }
}

/// Everything in `dsn` that is, or may be, its password: the parsed
/// password, the raw and percent-decoded URL password, the raw and unquoted
/// `password=` values. Lenient on purpose: it also works on DSNs that do not
/// parse, so that callers can scrub them out of any message.
pub fn password_candidates(dsn: &str) -> Vec<String> {
    let mut words = Vec::new();
    if let Ok(db) = Database::parse(dsn)
        && let Some(p) = db.password()
    {
        words.push(p);
    }
    let dsn = dsn.trim();
    if let Some(rest) = dsn
        .strip_prefix("postgres://")
        .or_else(|| dsn.strip_prefix("postgresql://"))
    {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
        {
            words.push(password.to_owned());
            words.push(percent_decode(password));
        }
    } else {
        words.extend(key_value_passwords(dsn));
    }
    words.retain(|w| !w.is_empty());
    words
}

/// `password` values of a key=value DSN, raw and unquoted, as far as it
/// tokenizes (an unterminated quote runs to the end).
fn key_value_passwords(dsn: &str) -> Vec<String> {
    let (pairs, _) = key_value_pairs(dsn);
    pairs
        .into_iter()
        .filter(|p| p.key == "password")
        .flat_map(|p| [p.raw.to_owned(), p.value])
        .collect()
}

/// The driver's parse error in our words: tokio-postgres names an option
/// (`invalid value for option `port``) but may also quote a character or
/// byte of the input, so only the shapes known to hold no value pass.
fn driver_parse_error(e: &tokio_postgres::Error) -> String {
    let source = std::error::Error::source(e)
        .map(ToString::to_string)
        .unwrap_or_default();
    let named = |prefix: &str| {
        source
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix('`'))
            .filter(|name| {
                !name.is_empty()
                    && name.len() <= 40
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
    };
    if let Some(option) = named("invalid value for option `") {
        format!("invalid value for option `{option}`")
    } else if let Some(option) = named("unknown option `") {
        format!("unknown option `{option}`")
    } else if source.starts_with("unknown option") {
        "unknown option".into()
    } else if source == "unterminated parameter" {
        "a query parameter has no '=' (expected key=value)".into()
    } else if source.contains("utf-8") || source.contains("UTF-8") {
        "not valid UTF-8 once percent-decoded".into()
    } else {
        "cannot be parsed".into()
    }
}

/// What [`split_url`] / [`split_key_value`] pull out of a DSN.
#[derive(Debug)]
struct Parts {
    /// The DSN without the TLS options tokio-postgres does not understand.
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    password: Option<String>,
}

/// Options this operator does not support, refused by name rather than
/// silently ignored (a client certificate the user expects would never be sent).
const UNSUPPORTED: [&str; 3] = ["sslcert", "sslkey", "sslpassword"];

fn unsupported(key: &str) -> Error {
    Error::InvalidConnectionString(format!(
        "option {key} (client certificates) is not supported; use password authentication"
    ))
}

fn split_url(dsn: &str) -> Result<Parts, Error> {
    // libpq reads user credentials only before the first '/' (an '@' after
    // it belongs to the database name or a parameter); tokio-postgres ends
    // them at the first '@' anywhere, so those are escaped for it.
    let escaped;
    let dsn = match dsn.split_once("://") {
        Some((scheme, rest)) if rest.contains('/') && rest.contains('@') => {
            let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(0));
            escaped = format!("{scheme}://{authority}{}", tail.replace('@', "%40"));
            escaped.as_str()
        }
        _ => dsn,
    };
    let (base, query) = match dsn.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (dsn, None),
    };
    let after_scheme = base.split_once("://").map_or("", |(_, r)| r);
    let authority = after_scheme.split('/').next().unwrap_or("");
    let password = authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| percent_decode(pw));
    let mut kept = Vec::new();
    let mut parts = Parts {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
        password,
    };
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(k);
        match key.as_str() {
            "sslmode" => parts.sslmode = Some(percent_decode(v)),
            "sslrootcert" => parts.sslrootcert = Some(percent_decode(v)),
            "password" => {
                parts.password = Some(percent_decode(v));
                kept.push(pair);
            }
            k if UNSUPPORTED.contains(&k) => return Err(unsupported(k)),
            _ => kept.push(pair),
        }
    }
    parts.rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(parts)
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// One `key=value` of a key=value DSN.
struct Pair<'a> {
    key: &'a str,
    /// The value, unquoted and unescaped.
    value: String,
    /// The value as written (inside the quotes, if quoted).
    raw: &'a str,
}

/// Tokenizes `key=value key = 'quoted value'` pairs with libpq's rules
/// (single quotes, backslash escapes, optional spaces around `=`): the
/// pairs up to the first error, and the error. An unterminated quoted
/// value is returned as a pair too (up to the end), for scrubbing.
fn key_value_pairs(dsn: &str) -> (Vec<Pair<'_>>, Option<Error>) {
    let mut pairs = Vec::new();
    let mut rest = dsn;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return (pairs, None);
        }
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        if key.is_empty() {
            let e = Error::InvalidConnectionString("an option name is missing before '='".into());
            return (pairs, Some(e));
        }
        let Some(after) = rest[key_end..].trim_start().strip_prefix('=') else {
            // The word is not shown: after `password=my secret` it is the
            // rest of a password that needed quotes.
            let e = Error::InvalidConnectionString(format!(
                "word {} has no '=' (expected key=value pairs; quote a value that holds spaces)",
                pairs.len() + 1
            ));
            return (pairs, Some(e));
        };
        let after = after.trim_start();
        let (quoted, body) = match after.strip_prefix('\'') {
            Some(body) => (true, body),
            None => (false, after),
        };
        let mut value = String::new();
        let mut end = None;
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '\'' if quoted => {
                    end = Some((i, i + 1));
                    break;
                }
                c if !quoted && c.is_whitespace() => {
                    end = Some((i, i));
                    break;
                }
                c => value.push(c),
            }
        }
        let (raw_end, next) = match end {
            Some(e) => e,
            None if quoted => {
                pairs.push(Pair {
                    key,
                    value,
                    raw: body,
                });
                let e = Error::InvalidConnectionString(format!(
                    "unterminated quoted value for {}",
                    if key.len() <= 20 { key } else { "an option" }
                ));
                return (pairs, Some(e));
            }
            None => (body.len(), body.len()),
        };
        pairs.push(Pair {
            key,
            value,
            raw: &body[..raw_end],
        });
        rest = &body[next..];
    }
}

/// The pairs of a key=value DSN, the TLS options taken out and the rest
/// requoted for tokio-postgres.
fn split_key_value(dsn: &str) -> Result<Parts, Error> {
    let (pairs, error) = key_value_pairs(dsn);
    if let Some(e) = error {
        return Err(e);
    }
    let mut kept = Vec::new();
    let mut parts = Parts {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
        password: None,
    };
    for Pair { key, value, .. } in pairs {
        match key {
            "sslmode" => parts.sslmode = Some(value),
            "sslrootcert" => parts.sslrootcert = Some(value),
            k if UNSUPPORTED.contains(&k) => return Err(unsupported(k)),
            _ => {
                kept.push(format!(
                    "{key}='{}'",
                    value.replace('\\', "\\\\").replace('\'', "\\'")
                ));
                if key == "password" {
                    parts.password = Some(value);
                }
            }
        }
    }
    parts.rest = kept.join(" ");
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_with_verify_full_and_root_cert() {
        let db = Database::parse(
            "postgres://app:s3cr%40t@db.example:6432/usage?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(db.tls_mode, TlsMode::VerifyFull);
        assert_eq!(
            db.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(db.password().as_deref(), Some("s3cr@t"));
        assert_eq!(db.application_name(), "x");
        assert_eq!(db.describe(), "app@db.example:6432/usage");
        let debug = format!("{db:?}");
        assert!(!debug.contains("s3cr"), "{debug}");
    }

    #[test]
    fn key_value_with_quotes_and_defaults() {
        let db = Database::parse(
            r"host=localhost port=5433 user=app password='it\'s a secret' dbname = usage sslmode=require",
        )
        .unwrap();
        assert_eq!(db.password().as_deref(), Some("it's a secret"));
        assert_eq!(db.tls_mode, TlsMode::Require);
        assert_eq!(db.application_name(), DEFAULT_APPLICATION_NAME);
        assert_eq!(db.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(db.describe(), "app@localhost:5433/usage");
    }

    #[test]
    fn the_target_names_hosts_ports_and_database_never_the_user_or_password() {
        let url = Database::parse("postgres://app:hunter22@db.example:6432/usage").unwrap();
        assert_eq!(url.target(), "db.example:6432/usage");
        // The same place spelled as key=value pairs, by another user.
        let kv = Database::parse("host=db.example port=6432 dbname=usage user=other").unwrap();
        assert_eq!(kv.target(), url.target());
        // No dbname: the server takes the user's name.
        let default = Database::parse("postgres://multica:pw@shop-postgres").unwrap();
        assert_eq!(default.target(), "shop-postgres:5432/multica");
        let several = Database::parse("host=a,b port=5432,5433 dbname=d user=u").unwrap();
        assert_eq!(several.target(), "a:5432,b:5433/d");
    }

    #[test]
    fn default_tls_mode_is_prefer() {
        let db = Database::parse("postgres://u@h/d").unwrap();
        assert_eq!(db.tls_mode, TlsMode::Prefer);
        let db = Database::parse("postgres://u@h/d?connect_timeout=3").unwrap();
        assert_eq!(db.connect_timeout(), Duration::from_secs(3));
    }

    #[test]
    fn bad_input_is_specific_and_never_echoes_the_password() {
        let cases = [
            ("", "empty"),
            ("not a dsn", "expected a postgres:// URL"),
            ("postgres://u:hunter22@h/d?sslmode=bogus", "unknown sslmode"),
            ("host=h password=hunter22 sslmode=maybe", "unknown sslmode"),
            ("host=h password=hunter22 sslcert=/x", "client certificates"),
            ("host=h password='hunter22", "unterminated"),
            ("host=h password=hunter22 port=notaport", "invalid"),
            ("user=u password=hunter22", "no host"),
            ("postgres://u:hunter22@h:99999/d", "invalid"),
            ("host=h password=hunter22 and more", "word 3 has no '='"),
        ];
        for (dsn, want) in cases {
            let e = Database::parse(dsn).unwrap_err().to_string();
            assert!(e.contains(want), "{dsn:?} gave {e:?}");
            assert!(!e.contains("hunter22"), "{dsn:?} echoed the password: {e}");
        }
        // A password that needed quotes: its words after the first are
        // not shown either.
        let e = Database::parse("host=h password=correct horse battery").unwrap_err();
        let e = e.to_string();
        assert!(!e.contains("horse") && !e.contains("battery"), "{e}");
    }

    #[test]
    fn parts_build_a_database_without_a_connection_string() {
        let db = Database::from_parts(ConnectionParts {
            host: "shop-postgres".into(),
            port: None,
            dbname: None,
            user: "multica".into(),
            password: Some(Password::new("p@ss word:/?'\\x")),
        })
        .unwrap();
        assert_eq!(db.describe(), "multica@shop-postgres:5432/multica");
        assert_eq!(db.password().as_deref(), Some("p@ss word:/?'\\x"));
        assert_eq!(db.tls_mode, TlsMode::Prefer);
        assert_eq!(db.application_name(), DEFAULT_APPLICATION_NAME);
        assert_eq!(db.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
        let debug = format!("{db:?}");
        assert!(!debug.contains("p@ss"), "{debug}");
        let parts = ConnectionParts {
            host: "db.example".into(),
            port: Some(6432),
            dbname: Some("usage".into()),
            user: "app".into(),
            password: Some(Password::new("hunter22")),
        };
        assert!(!format!("{parts:?}").contains("hunter22"));
        let db = Database::from_parts(parts).unwrap();
        assert_eq!(db.describe(), "app@db.example:6432/usage");
        let db = Database::from_parts(ConnectionParts {
            password: Some(Password::new("")),
            ..ConnectionParts {
                host: "h".into(),
                user: "u".into(),
                ..Default::default()
            }
        })
        .unwrap();
        assert_eq!(db.password(), None, "an empty password is no password");
    }

    #[test]
    fn parts_are_checked() {
        let ok = || ConnectionParts {
            host: "h".into(),
            user: "u".into(),
            password: Some(Password::new("hunter22")),
            ..Default::default()
        };
        for (parts, want) in [
            (
                ConnectionParts {
                    host: " ".into(),
                    ..ok()
                },
                "no host given",
            ),
            (
                ConnectionParts {
                    host: "a,b".into(),
                    ..ok()
                },
                "not one host",
            ),
            (
                ConnectionParts {
                    user: "".into(),
                    ..ok()
                },
                "no user given",
            ),
            (
                ConnectionParts {
                    port: Some(0),
                    ..ok()
                },
                "port must be",
            ),
        ] {
            let e = Database::from_parts(parts).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("hunter22"), "{e}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%40b%2"), "a@b%2");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn an_at_sign_after_the_host_is_not_the_end_of_credentials() {
        // libpq: credentials only before the first '/'.
        let db = Database::parse("postgres://h/d@x?application_name=a@b").unwrap();
        assert_eq!(db.describe(), "?@h:5432/d@x");
        assert_eq!(db.application_name(), "a@b");
        let db = Database::parse("postgres://u:p%40w@h/d@x").unwrap();
        assert_eq!(db.password().as_deref(), Some("p@w"));
        assert_eq!(db.describe(), "u@h:5432/d@x");
    }

    #[test]
    fn tokenizer_keeps_raw_and_unquoted_values() {
        let (pairs, error) = key_value_pairs(r"host=h  password = 'a\'b c' x=y\ z");
        assert!(error.is_none());
        let got: Vec<_> = pairs
            .iter()
            .map(|p| (p.key, p.value.as_str(), p.raw))
            .collect();
        assert_eq!(
            got,
            [
                ("host", "h", "h"),
                ("password", "a'b c", r"a\'b c"),
                ("x", "y z", r"y\ z"),
            ]
        );
        let (pairs, error) = key_value_pairs("host=h password='hunter22 x");
        assert!(error.unwrap().to_string().contains("unterminated"));
        assert_eq!(pairs[1].raw, "hunter22 x");
        assert_eq!(key_value_pairs("host=").0[0].value, "");
        let (pairs, error) = key_value_pairs("host=h =x");
        assert_eq!(pairs.len(), 1);
        assert!(
            error
                .unwrap()
                .to_string()
                .contains("option name is missing")
        );
    }

    #[test]
    fn driver_errors_are_reworded() {
        for (dsn, want) in [
            ("postgres://h/d?port=x", "invalid value for option `port`"),
            ("postgres://h/d?no_such=1", "unknown option `no_such`"),
            (
                "postgres://h/d?application_name=x&b",
                "a query parameter has no '=' (expected key=value)",
            ),
            ("postgres://h/%ff", "not valid UTF-8 once percent-decoded"),
        ] {
            let e = Database::parse(dsn).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("invalid database connection string: {want}"),
                "{dsn}"
            );
        }
    }
}
