-- root_cause_id_for(name): upsert a root cause by name and return its id; NULL in, NULL out.
-- Created by the bug-root-cause expand revision 6c55e0560fd4, dropped by its contract revision
-- e59b1f0c3d82 and re-created by that one's downgrade: both read this one file.
-- The backfill job and the sync trigger call it as root_cause_id_for(new.root_cause).
--
-- Race-safe by looping select-then-insert: when two sessions insert the same new name at once,
-- the second INSERT ... ON CONFLICT DO NOTHING waits for the first to commit, then inserts
-- nothing and returns no row, so it loops, and its next SELECT (a fresh snapshot under READ
-- COMMITTED) finds the committed row. If the first session rolled back, the retry inserts.
CREATE FUNCTION root_cause_id_for(p_name text) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_id bigint;
BEGIN
    IF p_name IS NULL THEN
        RETURN NULL;
    END IF;
    LOOP
        SELECT id INTO v_id FROM root_cause WHERE name = p_name;
        IF FOUND THEN
            RETURN v_id;
        END IF;
        INSERT INTO root_cause (name) VALUES (p_name)
        ON CONFLICT (name) DO NOTHING
        RETURNING id INTO v_id;
        IF FOUND THEN
            RETURN v_id;
        END IF;
    END LOOP;
END
$$
