"""The operations on the internal form: inspect, doctor, convert, merge, bake, extract, resize, diff, and the
metadata they write."""
