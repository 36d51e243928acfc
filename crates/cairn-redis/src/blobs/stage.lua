-- ARGV: prefix, base key, expire-at (ms; 0: none), then the chunk's bytes.
-- Stores a chunk of the blob at `base` without making it part of the blob yet (see commit.lua):
-- a checksummed write keeps its bytes aside until the checksum matches.
-- Returns the chunk's sequence number, or 0 when the blob does not exist.
local base, expire_at, data = ARGV[2], tonumber(ARGV[3]), ARGV[4]
if redis.call('EXISTS', base) == 0 then return 0 end
redis.call('HINCRBY', base, 'received', #data)
local seq = redis.call('HINCRBY', base, 'seq', 1)
redis.call('HSET', base .. ':c', seq, data)
if expire_at > 0 then
  redis.call('PEXPIREAT', base, expire_at)
  redis.call('PEXPIREAT', base .. ':c', expire_at)
end
return seq
