-- Removes consumers that own nothing and have been idle too long. The pending count is read in
-- the same script that deletes, so a consumer that received an entry meanwhile is never removed
-- (XGROUP DELCONSUMER would drop its pending entries).
--   KEYS[1] the stream; ARGV[1] the idle time (ms) after which a consumer without entries goes
-- Returns {group, consumer, idle_ms} per removed consumer.
local stream, max_idle = KEYS[1], tonumber(ARGV[1])
local removed = {}
if redis.call('EXISTS', stream) == 0 or redis.call('TYPE', stream).ok ~= 'stream' then return removed end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local gf = {}
  for i = 1, #g, 2 do gf[g[i]] = g[i + 1] end
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, gf['name'])) do
    local cf = {}
    for i = 1, #c, 2 do cf[c[i]] = c[i + 1] end
    local idle = tonumber(cf['idle']) or 0
    if tonumber(cf['pending']) == 0 and idle > max_idle then
      redis.call('XGROUP', 'DELCONSUMER', stream, gf['name'], cf['name'])
      removed[#removed + 1] = { gf['name'], cf['name'], idle }
    end
  end
end
return removed
