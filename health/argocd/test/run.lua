-- Runs the Argo CD health check against the sample objects, the way Argo CD
-- does: a fresh chunk per object, the object in the global `obj`, the
-- script's returned table as the health. Only the libraries Argo CD's Lua
-- VM offers are visible (no io, os, require), so a script that passes here
-- does not reach for something Argo CD lacks.
--
-- Usage: lua5.1 run.lua SCRIPT TESTS_JSON [SAMPLE.json ...]
-- TESTS_JSON lists {inputPath, healthStatus: {status, message}} per sample
-- (Argo CD's health_test.yaml, as JSON). Samples given as arguments must
-- all be listed there, so none is left untested.

local cjson = require("cjson")

local script_path, tests_path = arg[1], arg[2]
if script_path == nil or tests_path == nil then
  io.stderr:write("usage: lua5.1 run.lua SCRIPT TESTS_JSON [SAMPLE.json ...]\n")
  os.exit(2)
end

local function read(path)
  local f, err = io.open(path, "rb")
  if f == nil then
    error("cannot read " .. path .. ": " .. err)
  end
  local data = f:read("*a")
  f:close()
  return data
end

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

local function basename(path)
  return path:match("([^/]*)$")
end

-- Argo CD hands over the object without JSON nulls (they become nil).
local function strip_nulls(v)
  if type(v) ~= "table" then
    return v
  end
  local out = {}
  for k, x in pairs(v) do
    if x ~= cjson.null then
      out[k] = strip_nulls(x)
    end
  end
  return out
end

local source = read(script_path)
local tests = cjson.decode(read(tests_path)).tests
local dir = dirname(tests_path)

local VALID = { Healthy = true, Progressing = true, Degraded = true, Suspended = true, Missing = true }

local function sandbox(object)
  return {
    obj = object,
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
    pcall = pcall, select = select, tonumber = tonumber, tostring = tostring,
    type = type, unpack = unpack,
    string = string, table = table, math = math,
  }
end

local listed = {}
local passed, failed = 0, 0

for _, t in ipairs(tests) do
  listed[basename(t.inputPath)] = true
  local object = strip_nulls(cjson.decode(read(dir .. "/" .. t.inputPath)))
  local chunk, err = loadstring(source, "=" .. script_path)
  if chunk == nil then
    io.stderr:write("cannot load " .. script_path .. ": " .. err .. "\n")
    os.exit(1)
  end
  setfenv(chunk, sandbox(object))
  local ok, hs = pcall(chunk)
  local problem
  if not ok then
    problem = "script error: " .. tostring(hs)
  elseif type(hs) ~= "table" then
    problem = "script returned " .. type(hs) .. ", not a table"
  elseif not VALID[hs.status] then
    problem = "invalid status " .. tostring(hs.status)
  elseif type(hs.message) ~= "string" or hs.message == "" then
    problem = "no message"
  elseif hs.status ~= t.healthStatus.status or hs.message ~= t.healthStatus.message then
    problem = "got " .. hs.status .. " \"" .. hs.message .. "\"\n      want "
      .. t.healthStatus.status .. " \"" .. t.healthStatus.message .. "\""
  end
  if problem == nil then
    passed = passed + 1
    print(string.format("ok   %-36s %-11s %s", t.inputPath, hs.status, hs.message))
  else
    failed = failed + 1
    print(string.format("FAIL %-36s %s", t.inputPath, problem))
  end
end

for i = 3, #arg do
  local name = basename(arg[i])
  if name ~= basename(tests_path) and not listed[name] then
    failed = failed + 1
    print("FAIL " .. name .. ": sample not listed in " .. tests_path)
  end
end

print(string.format("argocd health check: %d of %d samples as expected", passed, passed + failed))
os.exit(failed == 0 and 0 or 1)
