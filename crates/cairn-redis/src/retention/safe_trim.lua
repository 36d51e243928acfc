-- Trims one stream by its policy without removing any entry a consumer group has not both
-- received and acknowledged (docs/contract.md §4). Everything happens in this one script, so no XREADGROUP,
-- XCLAIM or XAUTOCLAIM can run between computing the safe point and trimming.
--   KEYS[1] the stream, KEYS[2] the stream registry (a set of stream keys) on one Redis; on a
--           Redis Cluster the registry is in another slot, so it is not given and the caller
--           unregisters a missing stream itself (streams::Streams::safe_trim)
--   ARGV[1] the age bound as an id ('' none): entries older than it are past the maximum age
--   ARGV[2] the maximum length ('' none)
--   ARGV[3] '1' exact, '0' approximate (MINID ~: whole macro nodes only, never past the id)
-- The policy's target is the larger of the two MINIDs. The safe point is the minimum, over the
-- groups, of the oldest pending id and the successor of the last delivered id; the stream is
-- trimmed to MINID min(target, safe).
-- Returns {status} for 'missing' (the key is gone: unregistered, if KEYS[2] is given) and
-- 'wrongtype', else
-- {'ok', trimmed, length, first, last, target, safe, applied, capped, groups} with '' for
-- "none", capped 1 when safety kept entries the policy would have removed, and per group
-- {name, consumers, pending, last_delivered, oldest_pending, lag (-1 unknown)}.
local stream, registry = KEYS[1], KEYS[2]
local age_target, max_len, exact = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'

if redis.call('EXISTS', stream) == 0 then
  if registry then redis.call('SREM', registry, stream) end
  return { 'missing' }
end
if redis.call('TYPE', stream).ok ~= 'stream' then return { 'wrongtype' } end

local function first_id()
  local r = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if r[1] then return r[1][1] end
  return nil
end

local function last_id()
  local r = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if r[1] then return r[1][1] end
  return nil
end

local target = nil
if age_target ~= '' then target = age_target end
local len = redis.call('XLEN', stream)
if max_len and len > max_len then
  -- The first entry to keep sits at position len - max_len; read from whichever end is nearer.
  local keep
  if max_len == 0 then
    keep = id_succ(last_id())
  elseif len - max_len < max_len then
    local r = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - max_len + 1)
    keep = r[#r][1]
  else
    local r = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', max_len)
    keep = r[#r][1]
  end
  target = id_max(target, keep)
end

local safe = nil
local groups = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local pending = tonumber(f['pending']) or 0
  local delivered = f['last-delivered-id']
  local group_safe = id_succ(delivered)
  local oldest = ''
  if pending > 0 then
    oldest = redis.call('XPENDING', stream, f['name'])[2]
    group_safe = id_min(group_safe, oldest)
  end
  safe = id_min(safe, group_safe)
  local lag = tonumber(f['lag']) or -1
  groups[#groups + 1] = { f['name'], tonumber(f['consumers']) or 0, pending, delivered, oldest, lag }
end

local applied, capped, trimmed = nil, 0, 0
if target then
  applied = id_min(target, safe)
  if applied ~= target then
    -- Capped only if entries the policy wanted gone are still there: [applied, target).
    if #redis.call('XRANGE', stream, applied, '(' .. target, 'COUNT', 1) > 0 then capped = 1 end
  end
  local first = first_id()
  if first and id_cmp(first, applied) < 0 then
    if exact then
      trimmed = redis.call('XTRIM', stream, 'MINID', applied)
    else
      trimmed = redis.call('XTRIM', stream, 'MINID', '~', applied)
    end
  end
end

return { 'ok', trimmed, redis.call('XLEN', stream), first_id() or '', last_id() or '',
  target or '', safe or '', applied or '', capped, groups }
