"""The doors to the outside: the Docker engine, IPVS, the director's
namespace, real servers' namespaces, sysctls, health probes, metrics."""
