-- Claims a finished upload for the one submission that copies it into a request in another
-- slot (a Redis Cluster, another partition), so no other submission copies or takes it
-- meanwhile (submit.lua honours the claim too). The claim lapses after `hold` ms (Redis's
-- clock), so a submission that died holding it blocks nobody for long; the upload is deleted
-- once its request is stored. ARGV: prefix, base key, claimant (`upload_claimant` in
-- blobs/mod.rs and requests/common.lua), hold ms, mode: 'take' or 'drop'.
-- take: {'ok'} (unclaimed, already this claimant's, or the claim lapsed: now this claimant's),
--       {'missing'}, or {'held', holder}. drop: removes the claim if it is this claimant's; {'ok'}.
local base, claimant, hold, mode = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local m = redis.call('HMGET', base, 'offset', 'claimed_by', 'claimed_until')
if mode == 'drop' then
  if m[2] == claimant then redis.call('HDEL', base, 'claimed_by', 'claimed_until') end
  return { 'ok' }
end
if not m[1] then return { 'missing' } end
local now = redis_now_ms()
if m[2] and m[2] ~= claimant and (tonumber(m[3]) or 0) > now then return { 'held', m[2] } end
redis.call('HSET', base, 'claimed_by', claimant, 'claimed_until', now + hold)
return { 'ok' }
