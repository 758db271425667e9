-- seatwatch_observe with unknown describing fields (SPEC §7.2). A scraper answer whose seat counts are
-- counts is recorded even when its subject, catalog number or instructor is unknown (NULL here):
--   * subject / catalog_nbr (NOT NULL columns): the previous value of this (term, class_nbr), else the
--     legacy row of the same term, else the oldest watch's own, else '';
--   * instructor: the previous known name is kept, so Staff -> (blank) -> a name still notifies.
-- Migrations never redefine what exists, so this is a new function; seatwatch_observe stays as it was.
CREATE FUNCTION seatwatch_observe_v2(
    p_term text, p_class_nbr text, p_subject text, p_catalog_nbr text, p_title text, p_instructor text,
    p_seats_available integer, p_seats_capacity integer, p_non_reserved_seats integer,
    p_location text, p_meeting_times text
)
RETURNS TABLE (prev_source text, prev_instructor text, prev_seats_available integer,
               prev_non_reserved_seats integer)
LANGUAGE plpgsql SET search_path = public AS $$
#variable_conflict use_column
DECLARE
    prev record;
    source text;
    v_subject text := p_subject;
    v_catalog_nbr text := p_catalog_nbr;
    v_instructor text := p_instructor;
BEGIN
    -- Serialises checks of one section, even its very first one when there is no row to lock yet.
    PERFORM pg_advisory_xact_lock(hashtextextended('seatwatch:' || p_term || ':' || p_class_nbr, 0));

    SELECT s.subject, s.catalog_nbr, s.instructor_name, s.seats_available, s.non_reserved_seats INTO prev
    FROM seatwatch_section_states s
    WHERE s.term = p_term AND s.class_nbr = p_class_nbr
    FOR UPDATE;
    IF FOUND THEN
        source := 'seatwatch';
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
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::integer, NULL::integer;
    ELSE
        RETURN QUERY SELECT source, prev.instructor_name::text, prev.seats_available::integer,
                            prev.non_reserved_seats::integer;
    END IF;
END
$$;

REVOKE EXECUTE ON FUNCTION seatwatch_observe_v2(text, text, text, text, text, text, integer, integer, integer,
                                                text, text) FROM PUBLIC;
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('REVOKE EXECUTE ON FUNCTION seatwatch_observe_v2(text, text, text, text, text, text, '
                           'integer, integer, integer, text, text) FROM %I', r);
        END IF;
    END LOOP;
END
$$;
