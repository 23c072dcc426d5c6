"""`tsld-cache`: the teacher's outputs computed once (`cli` parses, `build` shards the work)."""
