-- job-runner: retry later
-- Schedules the job in the delayed set, then acknowledges the delivered entry, in one step.
--
-- KEYS[1]  the jobs stream
-- KEYS[2]  the delayed set (score: due time in ms)
-- ARGV[1]  the consumer group
-- ARGV[2]  the entry id
-- ARGV[3]  the job to run again (with its attempt count already updated)
-- ARGV[4]  the due time in ms since the Unix epoch
-- ARGV[5]  this consumer
--
-- Returns  1, or 0 when the entry is not pending for this consumer (another consumer
--          reclaimed it while this one stalled, or it is already retired): then nothing
--          is written, so a stalled runner cannot schedule a second copy of a job that
--          another runner now owns.
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[5]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
