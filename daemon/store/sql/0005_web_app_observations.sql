-- The web app as it really behaves (SPEC §6, §7.4). Additive only: new functions and a new table.

-- seatwatch_observe_v2, plus the web app's own observation in between. The web app scrapes a section when
-- a student adds a watch and upserts class_states; such a write is an observation too. When class_states
-- holds a row of the same term that is newer than seatwatch's own state, it is returned as the snapshot
-- (snap_*), and the edges are judged along own state -> snapshot -> the new scrape.
--
-- Newer means: its last_checked_at is later than seatwatch's own. The mirror's own write happens in the same
-- transaction as the own state's, so both carry that transaction's now() (the legacy trigger sets now() too):
-- equal, never newer. A row of another term (the same class number in another term) is never a snapshot.
-- Without own state, the class_states row of the same term is the previous state (the first tick after
-- cutover), as before.
CREATE FUNCTION seatwatch_observe_v3(
    p_term text, p_class_nbr text, p_subject text, p_catalog_nbr text, p_title text, p_instructor text,
    p_seats_available integer, p_seats_capacity integer, p_non_reserved_seats integer,
    p_location text, p_meeting_times text
)
RETURNS TABLE (prev_source text, prev_instructor text, prev_seats_available integer,
               prev_non_reserved_seats integer, snap_instructor text, snap_seats_available integer,
               snap_non_reserved_seats integer)
LANGUAGE plpgsql SET search_path = public AS $$
#variable_conflict use_column
DECLARE
    prev record;
    snap record;
    source text;
    has_snap boolean := false;
    v_subject text := p_subject;
    v_catalog_nbr text := p_catalog_nbr;
    v_instructor text := p_instructor;
BEGIN
    -- Serialises checks of one section, even its very first one when there is no row to lock yet.
    PERFORM pg_advisory_xact_lock(hashtextextended('seatwatch:' || p_term || ':' || p_class_nbr, 0));

    SELECT s.subject, s.catalog_nbr, s.instructor_name, s.seats_available, s.non_reserved_seats,
           s.last_checked_at INTO prev
    FROM seatwatch_section_states s
    WHERE s.term = p_term AND s.class_nbr = p_class_nbr
    FOR UPDATE;
    IF FOUND THEN
        source := 'seatwatch';
        SELECT c.instructor_name, c.seats_available, c.non_reserved_seats INTO snap
        FROM class_states c
        WHERE c.class_nbr = p_class_nbr AND c.term = p_term AND c.last_checked_at > prev.last_checked_at;
        has_snap := FOUND;
    ELSE
        SELECT c.subject, c.catalog_nbr, c.instructor_name, c.seats_available, c.non_reserved_seats INTO prev
        FROM class_states c
        WHERE c.class_nbr = p_class_nbr AND c.term = p_term;
        IF FOUND THEN
            source := 'class_states';
        END IF;
    END IF;

    IF source IS NOT NULL THEN
        v_subject := COALESCE(v_subject, NULLIF(prev.subject, ''));
        v_catalog_nbr := COALESCE(v_catalog_nbr, NULLIF(prev.catalog_nbr, ''));
        IF has_snap THEN
            v_instructor := COALESCE(v_instructor, snap.instructor_name);
        END IF;
        v_instructor := COALESCE(v_instructor, prev.instructor_name);
    END IF;
    IF v_subject IS NULL OR v_catalog_nbr IS NULL THEN
        SELECT COALESCE(v_subject, w.subject), COALESCE(v_catalog_nbr, w.catalog_nbr)
        INTO v_subject, v_catalog_nbr
        FROM class_watches w
        WHERE w.term = p_term AND w.class_nbr = p_class_nbr
        ORDER BY w.created_at, w.id
        LIMIT 1;
    END IF;
    v_subject := COALESCE(v_subject, '');
    v_catalog_nbr := COALESCE(v_catalog_nbr, '');

    INSERT INTO seatwatch_section_states AS s (
        term, class_nbr, subject, catalog_nbr, title, instructor_name, seats_available, seats_capacity,
        non_reserved_seats, location, meeting_times, last_checked_at, last_changed_at
    ) VALUES (
        p_term, p_class_nbr, v_subject, v_catalog_nbr, p_title, v_instructor, p_seats_available,
        p_seats_capacity, p_non_reserved_seats, p_location, p_meeting_times, now(), now()
    )
    ON CONFLICT (term, class_nbr) DO UPDATE SET
        subject = EXCLUDED.subject,
        catalog_nbr = EXCLUDED.catalog_nbr,
        title = EXCLUDED.title,
        instructor_name = EXCLUDED.instructor_name,
        seats_available = EXCLUDED.seats_available,
        seats_capacity = EXCLUDED.seats_capacity,
        non_reserved_seats = EXCLUDED.non_reserved_seats,
        location = EXCLUDED.location,
        meeting_times = EXCLUDED.meeting_times,
        last_checked_at = now(),
        last_changed_at = CASE
            WHEN s.seats_available IS DISTINCT FROM EXCLUDED.seats_available
              OR s.non_reserved_seats IS DISTINCT FROM EXCLUDED.non_reserved_seats
              OR s.instructor_name IS DISTINCT FROM EXCLUDED.instructor_name
            THEN now() ELSE s.last_changed_at END;

    -- The mirror for the web app's dashboard and Realtime: latest observation wins; its trigger keeps
    -- last_changed_at and last_checked_at.
    INSERT INTO class_states AS c (
        id, term, subject, catalog_nbr, class_nbr, title, instructor_name, seats_available, seats_capacity,
        non_reserved_seats, location, meeting_times, last_checked_at
    ) VALUES (
        gen_random_uuid(), p_term, v_subject, v_catalog_nbr, p_class_nbr, p_title, v_instructor,
        p_seats_available, p_seats_capacity, p_non_reserved_seats, p_location, p_meeting_times, now()
    )
    ON CONFLICT (class_nbr) DO UPDATE SET
        term = EXCLUDED.term,
        subject = EXCLUDED.subject,
        catalog_nbr = EXCLUDED.catalog_nbr,
        title = EXCLUDED.title,
        instructor_name = EXCLUDED.instructor_name,
        seats_available = EXCLUDED.seats_available,
        seats_capacity = EXCLUDED.seats_capacity,
        non_reserved_seats = EXCLUDED.non_reserved_seats,
        location = EXCLUDED.location,
        meeting_times = EXCLUDED.meeting_times,
        last_checked_at = now();

    IF source IS NULL THEN
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::integer, NULL::integer,
                            NULL::text, NULL::integer, NULL::integer;
    ELSIF has_snap THEN
        RETURN QUERY SELECT source, prev.instructor_name::text, prev.seats_available::integer,
                            prev.non_reserved_seats::integer, snap.instructor_name::text,
                            snap.seats_available::integer, snap.non_reserved_seats::integer;
    ELSE
        RETURN QUERY SELECT source, prev.instructor_name::text, prev.seats_available::integer,
                            prev.non_reserved_seats::integer, NULL::text, NULL::integer, NULL::integer;
    END IF;
END
$$;


-- Supabase's public roles are shut out of everything seatwatch owns (SPEC §6). Supabase grants every new
-- table, sequence and function in public to anon and authenticated (and functions are executable by PUBLIC
-- by default), and serves them over its REST API with the anon key the web app's bundle ships. So every
-- relation named seatwatch_* gets row-level security with no policy, and no privilege for PUBLIC, anon or
-- authenticated; every function named seatwatch_* is executable by none of them. The migration bookkeeping
-- table is included: a row deleted there made the next start re-run a migration and fail.
--
-- Idempotent and catalog-driven, so `migrate` runs it after every run (tables a later migration adds are
-- covered too); it changes only what is not yet shut, and so needs ownership only of what it changes.
-- Returns how many statements it ran.
CREATE FUNCTION seatwatch_lock_down()
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    obj record;
    statements integer := 0;
BEGIN
    FOR obj IN
        SELECT format('%I.%I', n.nspname, c.relname) AS name, c.relkind, c.relrowsecurity
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = pg_catalog.current_schema() AND c.relname LIKE 'seatwatch\_%'
          AND c.relkind IN ('r', 'p') AND NOT c.relrowsecurity
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', obj.name);
        statements := statements + 1;
    END LOOP;

    FOR obj IN
        SELECT DISTINCT
               CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind,
               format('%I.%I', n.nspname, c.relname) AS name,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
        WHERE n.nspname = pg_catalog.current_schema() AND c.relname LIKE 'seatwatch\_%'
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
          AND (a.grantee = 0 OR r.rolname IN ('anon', 'authenticated'))
    LOOP
        EXECUTE format('REVOKE ALL ON %s %s FROM %s', obj.kind, obj.name, obj.grantee);
        statements := statements + 1;
    END LOOP;

    -- Column privileges too: REVOKE ON TABLE leaves a column's own grant in place.
    FOR obj IN
        SELECT DISTINCT format('%I.%I', n.nspname, c.relname) AS name, quote_ident(at.attname) AS col,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee
        FROM pg_catalog.pg_attribute at
        JOIN pg_catalog.pg_class c ON c.oid = at.attrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN LATERAL pg_catalog.aclexplode(at.attacl) a
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
        WHERE n.nspname = pg_catalog.current_schema() AND c.relname LIKE 'seatwatch\_%'
          AND at.attacl IS NOT NULL AND (a.grantee = 0 OR r.rolname IN ('anon', 'authenticated'))
    LOOP
        EXECUTE format('REVOKE ALL (%s) ON TABLE %s FROM %s', obj.col, obj.name, obj.grantee);
        statements := statements + 1;
    END LOOP;

    -- A function's NULL acl is the default one, which lets PUBLIC execute it.
    FOR obj IN
        SELECT DISTINCT p.oid::regprocedure::text AS name,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee,
               CASE WHEN p.prokind = 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END AS kind
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
        CROSS JOIN LATERAL pg_catalog.aclexplode(COALESCE(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
        WHERE n.nspname = pg_catalog.current_schema() AND p.proname LIKE 'seatwatch\_%'
          AND p.prokind IN ('f', 'p') AND (a.grantee = 0 OR r.rolname IN ('anon', 'authenticated'))
    LOOP
        EXECUTE format('REVOKE ALL ON %s %s FROM %s', obj.kind, obj.name, obj.grantee);
        statements := statements + 1;
    END LOOP;
    RETURN statements;
END
$$;



-- The send-time re-check (SPEC §7.4). An email that cannot yet have reached Resend is re-checked before its
-- request; one no longer owed (recipient unsubscribed, bounced, complained, disabled or deleted, watch gone,
-- or a seat email whose section was seen full since) moves here with its reason instead of being sent.
-- No address and no payload are kept: the reason and the ids are what status and metrics need.
CREATE TABLE IF NOT EXISTS seatwatch_outbox_suppressed (
    id                bigint PRIMARY KEY,  -- the seatwatch_outbox row it was
    created_at        timestamptz NOT NULL,
    suppressed_at     timestamptz NOT NULL DEFAULT now(),
    class_watch_id    uuid,
    user_id           uuid,
    notification_type text NOT NULL,
    term              text NOT NULL,
    class_nbr         text NOT NULL,
    reason            text NOT NULL
);
CREATE INDEX IF NOT EXISTS seatwatch_outbox_suppressed_at ON seatwatch_outbox_suppressed (suppressed_at);

-- Attempts of a batch that were definitely refused (no connection, 429, 401/403): while every earlier
-- attempt was, nothing of the batch can have reached Resend, so it may still be re-checked and re-formed.
-- An attempt that started and never recorded an outcome (the process died mid-request) is not counted, so
-- such a batch is resent unchanged under its key. Existing batches start at 0: resent unchanged.
ALTER TABLE seatwatch_outbox_batches ADD COLUMN IF NOT EXISTS refused integer NOT NULL DEFAULT 0;

-- Everything above, and what 0002..0004 made, shut now (migrate runs it again after every run).
SELECT seatwatch_lock_down();
