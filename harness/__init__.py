"""What the tests, the benchmarks (bench/) and the lab (scripts/lab) share:
a lab of real containers on the host's dockerd (dockerlab), the in-memory
ports the controller runs over in unit tests and benchmarks (memory_ports),
and pyroute2's own IPVS records as an independent reference
(pyroute2_reference). Never imported by dockerlb itself."""
