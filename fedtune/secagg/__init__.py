"""SecAgg+ building blocks both wings use: the neighbour graph, key material and masking.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020 (SecAgg+), after Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (SecAgg). The server side of the
protocol is ``fedtune.server.secagg_plus``, the client side ``fedtune.client.secagg_stages``;
the keys of its messages are ``fedtune.protocol``'s.
"""
