-- Argo CD health check of usage.multica.ai/UsageBackfill.
--
-- Install as resource.customizations.health.usage.multica.ai_UsageBackfill
-- in argocd-cm (docs/packaging.md). Argo CD runs it with the live object in
-- the global `obj` and reads the returned table.
--
-- Healthy only when Ready=True describes the current generation: the sync
-- wave holding the UsageBackfill (or a hook) must not pass on a status left
-- over from an older spec (the previous version's runId), nor on a fresh
-- object the controller has not seen yet (observedGeneration -1).
-- Degraded on Stalled=True or phase Failed (terminal: fix the spec or the
-- Secret). Suspended while spec.suspend holds. Progressing otherwise,
-- including retries (Reconciling=True with a failure reason). Never Unknown:
-- Argo CD fails a sync hook whose health is Unknown.

local hs = {}

local generation = obj.metadata and obj.metadata.generation
local status = obj.status or {}
local spec = obj.spec or {}
local observed = status.observedGeneration

-- The status describes the spec as it is now.
local current = observed ~= nil and observed >= 0
  and (generation == nil or observed == generation)

-- A condition of this generation (conditions carry their own
-- observedGeneration; an older one says nothing about this spec).
local function condition(type_)
  if not current or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      if c.observedGeneration ~= nil and generation ~= nil
        and c.observedGeneration ~= generation then
        return nil
      end
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function text(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local function lock_holder(h)
  local m = "advisory lock 4246 is held by "
  if h.pid ~= nil then
    m = m .. "pid " .. h.pid
  else
    m = m .. "another session"
  end
  if h.applicationName ~= nil and h.applicationName ~= "" then
    m = m .. " (" .. h.applicationName .. ")"
  end
  if h.clientAddr ~= nil and h.clientAddr ~= "" then
    m = m .. " from " .. h.clientAddr
  end
  if h.since ~= nil then
    m = m .. " since " .. h.since
  end
  return m
end

local stalled = condition("Stalled")
local ready = condition("Ready")
local reconciling = condition("Reconciling")

if obj.metadata and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Being deleted: a run in progress is cancelled first"
  return hs
end

if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. text(stalled, "the run failed for good")
  return hs
end

if current and status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed: " .. (status.lastError or text(ready, "the run failed for good"))
  return hs
end

if is_true(ready) then
  hs.status = "Healthy"
  hs.message = text(ready, status.result or "Succeeded")
  return hs
end

if spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true: no run starts until it is false"
  return hs
end

hs.status = "Progressing"
if not current then
  local g = generation or "?"
  if observed ~= nil and observed >= 0 then
    hs.message = "Waiting for the controller: the status describes generation "
      .. observed .. ", the spec is at generation " .. g
  else
    hs.message = "Waiting for the controller to pick up generation " .. g
  end
  return hs
end

local phase = status.phase or "Pending"
local m = phase
if phase == "WaitingForLock" and status.lockHolder ~= nil then
  m = m .. ": " .. lock_holder(status.lockHolder)
elseif reconciling ~= nil and reconciling.message ~= nil and reconciling.message ~= "" then
  m = m .. ": " .. reconciling.message
end
-- A retry names the failure in Reconciling's reason (SliceFailed, ...).
if is_true(reconciling) and reconciling.reason ~= nil and reconciling.reason ~= phase
  and reconciling.reason ~= "Pending" and reconciling.reason ~= "Running" then
  m = m .. " (" .. reconciling.reason .. ")"
end
if status.progress ~= nil then
  m = m .. "; slices " .. status.progress
  if status.rowsTouched ~= nil then
    m = m .. ", " .. status.rowsTouched .. " rows"
  end
end
if status.attempts ~= nil and status.attempts > 1 then
  m = m .. "; attempt " .. status.attempts
end
hs.message = m
return hs
