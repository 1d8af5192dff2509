-- job-runner: touch
-- Resets the idle time of entries this consumer is working on, so that other consumers do
-- not reclaim them while their jobs run. Only entries still pending for this consumer are
-- touched: a plain XCLAIM would take an entry back from a consumer that reclaimed it while
-- this one stalled, and two runners would then both own the job.
--
-- KEYS[1]  the jobs stream
-- ARGV[1]  the consumer group
-- ARGV[2]  this consumer
-- ARGV[3..] the entry ids
--
-- Returns  the ids that are no longer this consumer's
local lost = {}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) == 0 then
    lost[#lost + 1] = ARGV[i]
  else
    -- JUSTID: the delivery count is left alone.
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return lost
