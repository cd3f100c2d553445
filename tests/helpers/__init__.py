"""Helpers shared by the tests: real servers on free ports, throwaway databases, polling."""
