-- job-runner: promote due jobs, and report what tells a queue node that lost data
-- Moves up to ARGV[1] jobs whose due time has passed, by the queue node's own clock, from
-- the delayed set to the stream. Atomic, so several runners promoting at once never
-- enqueue a job twice. Every runner calls it a few times a second, so it also returns
-- what the runner compares with what it has seen, to notice a node that came back empty
-- or with older data.
--
-- KEYS[1]  the jobs stream
-- KEYS[2]  the delayed set (score: due time in ms since the Unix epoch)
-- KEYS[3]  the queue's epoch key (a random value set when the queue was created)
-- ARGV[1]  the most to move
--
-- Returns  {moved, epoch or false, the stream's last generated id or false}
local now = redis.call('TIME')
local now_ms = string.format('%.0f', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, ARGV[1])
for _, job in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'job', job)
  redis.call('ZREM', KEYS[2], job)
end
local last = false
local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
if type(info) == 'table' and not info.err then
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
end
return {#due, redis.call('GET', KEYS[3]), last}
