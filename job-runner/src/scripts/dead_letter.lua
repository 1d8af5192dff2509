-- job-runner: dead-letter
-- Writes the entry to the dead-letter stream, then acknowledges and deletes it: the dead
-- entry exists before the ack, so a crash in between leaves the job pending (reclaimed
-- later), never lost.
--
-- KEYS[1]  the jobs stream
-- KEYS[2]  the dead-letter stream
-- ARGV[1]  the consumer group
-- ARGV[2]  the entry id
-- ARGV[3]  the raw job (as delivered, possibly malformed), or a readable summary of an
--          entry that is not a job
-- ARGV[4]  the reason
-- ARGV[5]  this consumer
-- ARGV[6]  '1' to keep the entry's exact fields too: they are copied into the dead
--          letter's `fields`, each name and value as `<length>:<bytes>`, in order. They
--          go into one value because field names may be any bytes, and the dead-letter
--          stream's own field names must stay readable.
-- ARGV[7]  the most dead letters kept: the oldest beyond it are dropped
--
-- Returns  {dead-letter entry id, how many old dead letters were dropped}, or false when
--          the entry is not pending for this consumer (another consumer reclaimed it
--          while this one stalled, or it is already retired): then nothing is written,
--          so a stalled runner cannot dead-letter a job that another runner now owns or
--          has finished.
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[5]) == 0 then
  return false
end
local id
local entry = ARGV[6] == '1' and redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])[1]
if entry then
  local parts = {}
  for _, part in ipairs(entry[2]) do
    parts[#parts + 1] = #part .. ':' .. part
  end
  id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[3], 'reason', ARGV[4], 'from', ARGV[2],
    'fields', table.concat(parts))
else
  id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[3], 'reason', ARGV[4], 'from', ARGV[2])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return {id, redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[7])}
