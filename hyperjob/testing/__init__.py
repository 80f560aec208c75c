"""Test and benchmark tooling (fixture writers); the product never imports it."""
