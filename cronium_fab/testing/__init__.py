"""Developer tooling, not the product (as Fabric's ``fabric.testing``): local OpenSSH sshd "hosts"
on 127.0.0.x for tests, benchmarks and ``make demo`` (``hosts``), and the demo itself (``demo``).
Nothing outside this package imports it."""
