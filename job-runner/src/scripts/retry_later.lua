-- job-runner: retry later
-- Schedules the job in the delayed set, then acknowledges the delivered entry, in one step.
--
-- KEYS[1]  the jobs stream
-- KEYS[2]  the delayed set (score: due time in ms)
-- ARGV[1]  the consumer group
-- ARGV[2]  the entry id
-- ARGV[3]  the job to run again (with its attempt count already updated)
-- ARGV[4]  the due time in ms since the Unix epoch
--
-- Returns  1
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
