-- include: lib_time
-- include: queue_lib
-- queue_stats: queue figures; changes nothing.
-- KEYS[1] stream, KEYS[2] delayed set, KEYS[3] dead letters
-- ARGV[1] group
-- Reply: JSON {stream, pending, delayed, dead_letters, next_due_ms}
local pending = 0
local summary = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(summary) == 'table' and summary[1] then pending = summary[1] end
return cjson.encode({
    stream = redis.call('XLEN', KEYS[1]),
    pending = pending,
    delayed = redis.call('ZCARD', KEYS[2]),
    dead_letters = redis.call('XLEN', KEYS[3]),
    next_due_ms = q_next_due(KEYS[2]),
    now_ms = now_ms(),
})
