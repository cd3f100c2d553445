"""The executor: runs task code in task processes and reports to the scheduler."""
