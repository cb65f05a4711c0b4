//! TLS for PostgreSQL connections, with rustls only (no OpenSSL at run time).
//!
//! libpq's modes map onto two rustls verifiers: prefer/require encrypt but
//! check nothing (that is what libpq does), verify-ca checks the chain but
//! not the name, verify-full checks both.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::Error;
use super::dsn::{Database, TlsMode};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the TLS connector and the tokio-postgres ssl mode for `db`.
pub(crate) fn connector(db: &Database) -> Result<(MakeRustlsConnect, SslMode), Error> {
    let ca = load_ca(db)?;
    // A CA bundle with `require` means verify-ca, as in libpq.
    let mode = match (db.tls_mode, &ca) {
        (TlsMode::Require, Some(_)) => TlsMode::VerifyCa,
        (m, _) => m,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("TLS setup failed: {e}")))?;
    let algorithms = provider().signature_verification_algorithms;
    let config = match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification { algorithms }))
            .with_no_client_auth(),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = ca.ok_or_else(|| {
                Error::Tls(format!(
                    "sslmode {} needs a CA bundle (database.tls.caSecretRef, --ca-file or sslrootcert)",
                    mode.as_str()
                ))
            })?;
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| Error::Tls(format!("invalid CA bundle: {e}")))?;
            let verifier: Arc<dyn ServerCertVerifier> = if mode == TlsMode::VerifyCa {
                Arc::new(ChainOnly { inner: verifier })
            } else {
                verifier
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    let ssl_mode = match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    };
    Ok((MakeRustlsConnect::new(config), ssl_mode))
}

fn load_ca(db: &Database) -> Result<Option<RootCertStore>, Error> {
    let pem = match (&db.ca_pem, &db.ca_file) {
        (Some(pem), _) => pem.clone(),
        (None, Some(path)) => std::fs::read(path)
            .map_err(|e| Error::Tls(format!("cannot read sslrootcert {}: {e}", path.display())))?,
        (None, None) => return Ok(None),
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| Error::Tls(format!("invalid CA bundle: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("invalid CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls(
            "the CA bundle holds no PEM certificate".to_string(),
        ));
    }
    Ok(Some(roots))
}

/// verify-ca: the chain must be valid, the name is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// prefer / require: encrypt, trust any certificate (libpq's behaviour).
/// Handshake signatures are still checked so the session key is sound.
#[derive(Debug)]
struct NoVerification {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_need_a_ca() {
        let db = Database::parse("postgres://u@h/d?sslmode=verify-full").unwrap();
        let e = connector(&db).err().unwrap().to_string();
        assert!(e.contains("needs a CA bundle"), "{e}");
        let db = db.with_ca_pem(b"not pem".to_vec());
        let e = connector(&db).err().unwrap().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn require_and_prefer_build_without_a_ca() {
        for mode in ["disable", "prefer", "require"] {
            let db = Database::parse(&format!("postgres://u@h/d?sslmode={mode}")).unwrap();
            assert!(connector(&db).is_ok(), "{mode}");
        }
    }
}
