-- job-runner: promote due jobs
-- Moves up to ARGV[2] jobs whose due time has passed from the delayed set to the stream.
-- Atomic, so several runners promoting at once never enqueue a job twice.
--
-- KEYS[1]  the jobs stream
-- KEYS[2]  the delayed set
-- ARGV[1]  now, in ms since the Unix epoch
-- ARGV[2]  the most to move
--
-- Returns  how many were moved
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, job in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'job', job)
  redis.call('ZREM', KEYS[2], job)
end
return #due
