-- include: lib_time
-- include: queue_lib
-- dlq_requeue: put dead-lettered jobs back on the queue with fresh attempts.
-- KEYS[1] stream, KEYS[2] jobs hash, KEYS[3] delayed set, KEYS[4] dead letters
-- ARGV: dead-letter entry ids; none = every dead letter (at most 10000 per call)
-- A job already waiting, running or delayed is not added twice; its dead letter is removed all the same.
-- Entries without a usable term and class number stay in the dead-letter stream.
-- Reply: JSON {requeued, already_queued, invalid, missing}
local now = now_ms()
local entries = {}
if #ARGV == 0 then
    entries = redis.call('XRANGE', KEYS[4], '-', '+', 'COUNT', 10000)
else
    for _, eid in ipairs(ARGV) do
        local found = redis.call('XRANGE', KEYS[4], eid, eid)
        if #found > 0 then entries[#entries + 1] = found[1] else entries[#entries + 1] = {eid, false} end
    end
end
local requeued, already, invalid, missing = 0, 0, 0, 0
for _, e in ipairs(entries) do
    if not e[2] then
        missing = missing + 1
    else
        local f = q_fields(e)
        if f.term == nil or f.term == '' or f.class_nbr == nil or f.class_nbr == '' then
            invalid = invalid + 1
        else
            local id = f.term .. '-' .. f.class_nbr
            if q_live(KEYS[1], KEYS[2], KEYS[3], id) then
                already = already + 1
            else
                q_add(KEYS[1], KEYS[2], id, f.term, f.class_nbr, 0, now)
                requeued = requeued + 1
            end
            redis.call('XDEL', KEYS[4], e[1])
        end
    end
end
return cjson.encode({requeued = requeued, already_queued = already, invalid = invalid, missing = missing})
