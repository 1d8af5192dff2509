-- job-runner: acknowledge
-- Retires done entries (acknowledges and deletes them: a finished entry is of no more use,
-- and the stream must stay bounded by the work in flight), each only if it is still
-- pending for this consumer: a runner that stalled past the visibility timeout finds its
-- entry taken over, and must not retire it under the consumer that now owns it (which may
-- have scheduled a copy of the job or be running it).
--
-- KEYS[1]  the jobs stream
-- ARGV[1]  the consumer group
-- ARGV[2]  this consumer
-- ARGV[3..] the entry ids
--
-- Returns  per entry id, 1 when it was retired, 0 when it is not this consumer's
local done, ours = {}, {}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) == 0 then
    done[#done + 1] = 0
  else
    ours[#ours + 1] = ARGV[i]
    done[#done + 1] = 1
  end
end
-- One XACK and one XDEL for all of them: a call per entry each was most of the cost.
-- (At most 512 ids, the ack task's batch, well within Lua's stack for `unpack`.)
if #ours > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ours))
  redis.call('XDEL', KEYS[1], unpack(ours))
end
return done
