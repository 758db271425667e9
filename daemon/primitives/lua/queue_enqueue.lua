-- include: lib_time
-- include: queue_lib
-- queue_enqueue: add sections as batch entries, skipping any that is still waiting, running or delayed.
-- KEYS[1] stream, KEYS[2] delayed set, KEYS[3] lock metadata (fencing)
-- ARGV[1] fencing token ('' = not fenced), ARGV[2] sections per entry, then pairs ARGV[2k+1] term,
-- ARGV[2k+2] class_nbr
-- Cost: TIME, the fence, one XRANGE and one ZRANGE for the dedup, one XADD per batch: nothing per section.
-- Reply: JSON {added, skipped, entries} | {fenced = true} when the lock changed hands (nothing is added)
if ARGV[1] ~= '' and redis.call('HGET', KEYS[3], 'fence') ~= ARGV[1] then
    return cjson.encode({fenced = true, added = 0, skipped = 0, entries = 0})
end
local per_entry = tonumber(ARGV[2])
local live = q_live(KEYS[1], KEYS[2])
local now
local added, skipped, entries, batch = 0, 0, 0, {}
local function flush()
    if #batch > 0 then
        now = now or now_ms()
        q_add(KEYS[1], batch, now)
        entries = entries + 1
        batch = {}
    end
end
for i = 3, #ARGV, 2 do
    local term, class_nbr = ARGV[i], ARGV[i + 1]
    local id = term .. '-' .. class_nbr
    if live[id] then
        skipped = skipped + 1
    else
        live[id] = true
        batch[#batch + 1] = {term, class_nbr, 0}
        added = added + 1
        if #batch >= per_entry then flush() end
    end
end
flush()
return cjson.encode({added = added, skipped = skipped, entries = entries})
