-- job-runner: retry later
-- Schedules the job in the delayed set, then acknowledges and deletes the delivered entry,
-- in one step.
-- The due time is taken from the queue node's clock, the one promotion compares it with,
-- so runners' clocks need not agree.
--
-- KEYS[1]  the jobs stream
-- KEYS[2]  the delayed set (score: due time in ms since the Unix epoch)
-- ARGV[1]  the consumer group
-- ARGV[2]  the entry id
-- ARGV[3]  the job to run again (with its attempt count already updated)
-- ARGV[4]  the delay in ms
-- ARGV[5]  this consumer
--
-- Returns  1, or 0 when the entry is not pending for this consumer (another consumer
--          reclaimed it while this one stalled, or it is already retired): then nothing
--          is written, so a stalled runner cannot schedule a second copy of a job that
--          another runner now owns.
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[5]) == 0 then
  return 0
end
local now = redis.call('TIME')
local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], string.format('%.0f', due), ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
