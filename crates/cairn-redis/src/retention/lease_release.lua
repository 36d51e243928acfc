-- Hands the lease back if this instance holds it.
--   KEYS[1] the lease; ARGV[1] the instance
-- Returns 1 when it was held and is now deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
