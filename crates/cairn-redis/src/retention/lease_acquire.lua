-- Renews the lease if this instance holds it, takes it if nobody does, else names the holder.
-- One call, so a lease that just expired cannot be taken twice.
--   KEYS[1] the lease; ARGV[1] the instance, ARGV[2] the ttl (ms)
-- Returns {'renewed' | 'acquired' | 'held', holder}.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return { 'renewed', holder }
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return { 'acquired', ARGV[1] } end
return { 'held', holder }
