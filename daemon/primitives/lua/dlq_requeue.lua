-- include: lib_time
-- include: queue_lib
-- dlq_requeue: put dead-lettered sections back on the queue with fresh attempts, as batch entries.
-- KEYS[1] stream, KEYS[2] delayed set, KEYS[3] dead letters
-- ARGV[1] sections per entry, then dead-letter entry ids; none = every dead letter (at most 10000 per call)
-- A section already waiting, running or delayed is not added twice; its dead letter is removed all the same.
-- Entries without a usable term and class number stay in the dead-letter stream.
-- Reply: JSON {requeued, already_queued, invalid, missing}
local per_entry = tonumber(ARGV[1])
local entries = {}
if #ARGV == 1 then
    entries = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 10000)
else
    for i = 2, #ARGV do
        local eid = ARGV[i]
        local found = redis.call('XRANGE', KEYS[3], eid, eid)
        if #found > 0 then entries[#entries + 1] = found[1] else entries[#entries + 1] = {eid, false} end
    end
end
local live = q_live(KEYS[1], KEYS[2])
local now = now_ms()
local requeued, already, invalid, missing, batch, gone = 0, 0, 0, 0, {}, {}
for _, e in ipairs(entries) do
    if not e[2] then
        missing = missing + 1
    else
        local f = q_fields(e)
        if f.term == nil or f.term == '' or f.class_nbr == nil or f.class_nbr == '' then
            invalid = invalid + 1
        else
            local id = f.term .. '-' .. f.class_nbr
            if live[id] then
                already = already + 1
            else
                live[id] = true
                batch[#batch + 1] = {f.term, f.class_nbr, 0}
                requeued = requeued + 1
                if #batch >= per_entry then q_add(KEYS[1], batch, now); batch = {} end
            end
            gone[#gone + 1] = e[1]
        end
    end
end
if #batch > 0 then q_add(KEYS[1], batch, now) end
for i = 1, #gone, 1000 do
    redis.call('XDEL', KEYS[3], unpack(gone, i, math.min(i + 999, #gone)))
end
return cjson.encode({requeued = requeued, already_queued = already, invalid = invalid, missing = missing})
