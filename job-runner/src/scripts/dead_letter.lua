-- job-runner: dead-letter
-- Writes the entry to the dead-letter stream, then acknowledges it: the dead entry exists
-- before the ack, so a crash in between leaves the job pending (reclaimed later), never
-- lost.
--
-- KEYS[1]  the jobs stream
-- KEYS[2]  the dead-letter stream
-- ARGV[1]  the consumer group
-- ARGV[2]  the entry id
-- ARGV[3]  the raw job (as delivered, possibly malformed)
-- ARGV[4]  the reason
--
-- Returns  the dead-letter entry id
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[3], 'reason', ARGV[4], 'from', ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return id
