-- include: lib_time
-- include: queue_lib
-- queue_stats: the queue's figures, in sections; changes nothing. Read only when status asks.
-- KEYS[1] stream, KEYS[2] delayed set, KEYS[3] dead letters
-- ARGV[1] group
-- Reply: JSON {stream, pending, delayed, dead_letters, next_due_ms, now_ms}
local pending_ids = {}
local summary = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 10000)
if type(summary) == 'table' and not summary.err then
    for _, p in ipairs(summary) do pending_ids[p[1]] = true end
end
local waiting, pending = q_count(KEYS[1], pending_ids)
local delayed, next_due = q_delayed_count(KEYS[2])
return cjson.encode({
    stream = waiting + pending,
    pending = pending,
    delayed = delayed,
    dead_letters = redis.call('XLEN', KEYS[3]),
    next_due_ms = next_due,
    now_ms = now_ms(),
})
