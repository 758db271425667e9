-- include: lib_time
-- include: queue_lib
-- queue_enqueue: add sections as jobs, skipping any whose job is still waiting, running or delayed.
-- KEYS[1] stream, KEYS[2] jobs hash, KEYS[3] delayed set, KEYS[4] lock metadata (fencing)
-- ARGV[1] fencing token ('' = not fenced), then pairs ARGV[2k] term, ARGV[2k+1] class_nbr
-- Reply: JSON {added, skipped} | {fenced = true} when the lock changed hands (nothing is added)
local now = now_ms()
if ARGV[1] ~= '' and redis.call('HGET', KEYS[4], 'fence') ~= ARGV[1] then
    return cjson.encode({fenced = true, added = 0, skipped = 0})
end
local added, skipped = 0, 0
for i = 2, #ARGV, 2 do
    local term, class_nbr = ARGV[i], ARGV[i + 1]
    local id = term .. '-' .. class_nbr
    if q_live(KEYS[1], KEYS[2], KEYS[3], id) then
        skipped = skipped + 1
    else
        q_add(KEYS[1], KEYS[2], id, term, class_nbr, 0, now)
        added = added + 1
    end
end
return cjson.encode({added = added, skipped = skipped})
