-- Argo CD health check for kiln.dev/LLMEngine (resource.customizations.health.kiln.dev_LLMEngine).
-- An engine is Healthy once its artifact is built and verified, Progressing while it waits for a
-- build node or builds (with progress), Degraded when the build failed for good.
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

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiln operator to schedule a build"
  return hs
end

local status = obj.status
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiln operator to observe generation " .. generation
  return hs
end

local phase = status.phase

if phase == "Ready" then
  hs.status = "Healthy"
  hs.message = text(condition(status, "Ready"), "Engine built")
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = text(condition(status, "Failed"), text(condition(status, "Ready"), "Build failed"))
  return hs
end

if phase == "Building" then
  hs.status = "Progressing"
  local message = "Building"
  if status.step ~= nil and status.step ~= "" then
    message = message .. " (" .. status.step .. ")"
  end
  if status.progress ~= nil then
    message = message .. ": " .. status.progress .. "%"
  end
  if status.attempts ~= nil and status.attempts > 1 then
    message = message .. ", attempt " .. status.attempts
  end
  hs.message = message
  return hs
end

if phase == "Pending" then
  hs.status = "Progressing"
  hs.message = text(condition(status, "Building"), "Waiting for a build node")
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
