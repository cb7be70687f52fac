"""One reader per source format (native, reference, DriveBench, DriveLM), the JSON parsing they share, and
the typed field checks they use; `drivekd.data.formats` detects a file's format and dispatches here."""
