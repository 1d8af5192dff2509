-- job-runner: retry a dead letter
-- Moves a dead-letter entry back into the jobs stream, atomically, so two operators
-- retrying the same entry at once enqueue it only once.
--
-- KEYS[1]  the jobs stream
-- KEYS[2]  the dead-letter stream
-- ARGV[1]  the dead-letter entry id
-- ARGV[2]  the job to enqueue (attempt count reset)
--
-- Returns  1 when moved, 0 when the entry is gone
if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[1])
return 1
