-- queue_lib: the batch entries shared by the queue scripts.
--
-- Every command a script runs is billed (SPEC §5), so nothing here costs a command per section: one stream
-- entry carries a batch of sections, one delayed member carries a batch of retries, and the dedup of waiting
-- sections reads the whole stream and the whole delayed set once per call (each is one command, whatever
-- its size; the stream holds only outstanding work).
--
-- A batch entry has the fields batch (JSON [[term, class_nbr, attempts], ...]; attempts spent before this
-- delivery) and enqueued_ms. An entry of the old layout (one section: id, term, class_nbr, attempts,
-- enqueued_ms) is read as a batch of one, so work queued by an older daemon is finished, not lost.
-- A delayed member is JSON {b = batch, e = enqueued_ms}; a member of the old layout is a job
-- id whose payload sits in the old payloads hash. The entry stands for its sections until it is
-- acknowledged: XACK answering 1 is what proves a settlement still owns it (an entry taken over after the
-- visibility timeout was acknowledged and deleted by the maintenance that requeued its sections).

local function q_add(stream, batch, enqueued_ms)
    return redis.call('XADD', stream, '*', 'batch', cjson.encode(batch), 'enqueued_ms', enqueued_ms)
end

local function q_remove(stream, group, eid)
    local acked = redis.call('XACK', stream, group, eid)
    redis.call('XDEL', stream, eid)
    return acked == 1
end

-- Two equal members (the same sections, enqueued at the same moment) are one: merging them is the dedup.
local function q_delay(delayed, due_ms, batch, enqueued_ms)
    redis.call('ZADD', delayed, due_ms, cjson.encode({b = batch, e = tonumber(enqueued_ms)}))
end

local function q_dead(dlq, maxlen, id, term, class_nbr, attempts, error, eid, now, raw)
    redis.call('XADD', dlq, 'MAXLEN', '~', maxlen, '*', 'id', id or '', 'term', term or '',
        'class_nbr', class_nbr or '', 'attempts', attempts or 0, 'error', error, 'entry', eid,
        'failed_ms', now, 'raw', raw or '')
end

local function q_fields(entry)
    local f = {}
    local kv = entry[2]
    for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
    return f
end

-- Why an old-layout entry is not a job, or nil when it is one; the same rules, in the same order, as the
-- reader's queue_wire.parse_entry, so an entry fares the same whichever path takes it.
local function q_not_a_job(f)
    if f.term == nil or f.term == '' or f.class_nbr == nil or f.class_nbr == '' then
        return 'malformed entry: no term or class_nbr'
    end
    if not (string.find(f.term, '^[!-~]+$') and string.find(f.class_nbr, '^[!-~]+$')) then
        return 'malformed entry: term or class_nbr is not printable ASCII'
    end
    if f.id ~= f.term .. '-' .. f.class_nbr then
        return 'malformed entry: id does not match term and class_nbr'
    end
    local attempts, enqueued = f.attempts or '0', f.enqueued_ms or '0'
    if not (string.find(attempts, '^%d+$') and string.find(enqueued, '^%d+$')) then
        return 'malformed entry: attempts or enqueued_ms is not a whole number'
    end
    -- enqueued_ms past 2^53 compared as 16 digits: tonumber would round 9007199254740993 down to 2^53.
    if #attempts > 4 or tonumber(attempts) > 1000 or #enqueued > 16
        or (#enqueued == 16 and enqueued > '9007199254740992') then
        return 'malformed entry: attempts or enqueued_ms out of range'
    end
    return nil
end

-- Why one section of a batch is not a job, or nil (queue_wire.parse_stream_entry has the same rules).
local function q_bad_section(s)
    if type(s) ~= 'table' or type(s[1]) ~= 'string' or type(s[2]) ~= 'string' or type(s[3]) ~= 'number' then
        return 'malformed section: not [term, class_nbr, attempts]'
    end
    if not (string.find(s[1], '^[!-~]+$') and string.find(s[2], '^[!-~]+$')) then
        return 'malformed entry: term or class_nbr is not printable ASCII'
    end
    if s[3] < 0 or s[3] > 1000 or s[3] ~= math.floor(s[3]) then
        return 'malformed entry: attempts or enqueued_ms out of range'
    end
    return nil
end

-- An entry's sections: (list of {term, class_nbr, attempts} or nil, enqueued_ms, why not) for either layout.
-- Only sections that are jobs are listed; a batch entry that is not a batch at all gives nil and a reason.
local function q_sections(f)
    if f.batch ~= nil then
        local ok, batch = pcall(cjson.decode, f.batch)
        local enqueued = f.enqueued_ms or '0'
        if not ok or type(batch) ~= 'table' or #batch == 0 or not string.find(enqueued, '^%d+$')
            or #enqueued > 16 then
            return nil, enqueued, 'malformed entry: batch is not a list of sections'
        end
        return batch, enqueued, nil
    end
    local why = q_not_a_job(f)
    if why ~= nil then return nil, f.enqueued_ms or '0', why end
    return {{f.term, f.class_nbr, tonumber(f.attempts or '0')}}, f.enqueued_ms or '0', nil
end

-- Every section waiting, running or delayed (ids "{term}-{class_nbr}" -> true): one XRANGE and one ZRANGE,
-- and, when the old layout's delayed members are found, nothing more (their member is the id).
local function q_live(stream, delayed)
    local live = {}
    for _, e in ipairs(redis.call('XRANGE', stream, '-', '+')) do
        local batch = q_sections(q_fields(e))
        if batch then
            for _, s in ipairs(batch) do
                if type(s) == 'table' and type(s[1]) == 'string' and type(s[2]) == 'string' then
                    live[s[1] .. '-' .. s[2]] = true
                end
            end
        end
    end
    for _, m in ipairs(redis.call('ZRANGE', delayed, 0, -1)) do
        if string.sub(m, 1, 1) == '{' then
            local ok, d = pcall(cjson.decode, m)
            if ok and type(d) == 'table' and type(d.b) == 'table' then
                for _, s in ipairs(d.b) do
                    if type(s) == 'table' and type(s[1]) == 'string' and type(s[2]) == 'string' then
                        live[s[1] .. '-' .. s[2]] = true
                    end
                end
            end
        else
            live[m] = true
        end
    end
    return live
end

-- Run a command against the group, creating the group (and stream) first if an operator or an eviction
-- removed it; one command when the group exists.
local function q_group_call(stream, group, ...)
    local r = redis.pcall(...)
    if type(r) == 'table' and r.err then
        if string.find(r.err, 'NOGROUP') then
            redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
            return redis.call(...)
        end
        error(r)
    end
    return r
end

-- Sections waiting and pending in the stream (one XRANGE), given the pending entries' ids.
local function q_count(stream, pending_ids)
    local waiting, pending = 0, 0
    for _, e in ipairs(redis.call('XRANGE', stream, '-', '+')) do
        local batch = q_sections(q_fields(e))
        local n = batch and #batch or 1
        if pending_ids[e[1]] then pending = pending + n else waiting = waiting + n end
    end
    return waiting, pending
end

-- Sections in the delayed set (one ZRANGE), and the earliest due time (-1: none).
local function q_delayed_count(delayed)
    local n, first = 0, -1
    local members = redis.call('ZRANGE', delayed, 0, -1, 'WITHSCORES')
    for i = 1, #members, 2 do
        local m = members[i]
        local size = 1
        if string.sub(m, 1, 1) == '{' then
            local ok, d = pcall(cjson.decode, m)
            if ok and type(d) == 'table' and type(d.b) == 'table' then size = #d.b end
        end
        n = n + size
        if first < 0 then first = tonumber(members[i + 1]) end
    end
    return n, first
end
