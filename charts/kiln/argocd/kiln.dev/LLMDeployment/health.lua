-- Argo CD health check for kiln.dev/LLMDeployment (resource.customizations.health.kiln.dev_LLMDeployment).
-- Phase and conditions come from the Kiln operator; a status written for an older generation is
-- never taken as the health of the current spec.
local hs = {}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function text(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiln operator to reconcile"
  return hs
end

local status = obj.status
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiln operator to observe generation " .. generation
  return hs
end

local ready = condition(status, "Ready")
local degraded = condition(status, "Degraded")
local unschedulable = condition(status, "Unschedulable")
local progressing = condition(status, "Progressing")
local phase = status.phase

if ready ~= nil and generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiln operator to observe generation " .. generation
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = text(ready, text(degraded, "Failed"))
  return hs
end

if phase == "Degraded" or is_true(degraded) then
  hs.status = "Degraded"
  hs.message = text(degraded, text(ready, "Degraded"))
  return hs
end

if phase == "ScaledToZero" then
  -- Intentionally idle: the autoscaler scaled to zero and scales up again on traffic.
  hs.status = "Suspended"
  hs.message = text(ready, "Scaled to zero; scales up on the next request")
  return hs
end

if phase == "Ready" then
  if ready ~= nil and ready.status ~= "True" then
    hs.status = "Progressing"
    hs.message = text(ready, "Waiting for the Ready condition")
    return hs
  end
  hs.status = "Healthy"
  local replicas = status.readyReplicas or 0
  hs.message = text(ready, replicas .. " replica(s) ready")
  return hs
end

if phase == "Pending" or phase == "Building" or phase == "Deploying" then
  hs.status = "Progressing"
  if is_true(unschedulable) then
    hs.message = "Unschedulable: " .. text(unschedulable, "no node fits a replica")
  else
    hs.message = text(progressing, phase)
  end
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
