"""The gRPC port's TLS: the farm's certificate and key, and a client CA for mTLS, re-read when they change.

cert-manager renews a certificate in place weeks before it expires; a farm that runs for months
must serve the new one without a restart. gRPC asks for the configuration on every new
connection, so a renewed file is served from the next connection on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from renderfarm.cluster.config import FarmConfig

log = logging.getLogger(__name__)


class _Files:
    """The PEM files, read again when any of them changes (a Secret's mount swaps all at once)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None):
        self._paths = [path for path in (cert, key, client_ca) if path is not None]
        self._stamp = self._stat()

    def _stat(self) -> tuple:
        return tuple((status.st_ino, status.st_mtime_ns, status.st_size) for status in map(os.stat, self._paths))

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, *client_ca = (path.read_bytes() for path in self._paths)
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=client_ca[0] if client_ca else None
        )

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration if the files changed since the last read, else None (keep it)."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            configuration = self.configuration()
        except (OSError, ValueError) as error:
            log.error("TLS files unreadable (%s); serving the certificate read before", error)
            return None
        self._stamp = stamp
        log.info("TLS certificate files changed; new connections get the new certificate")
        return configuration


def server_credentials(config: FarmConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the farm's port, or None when it serves plaintext. Unreadable files raise OSError."""
    if config.tls_cert_file is None:
        return None
    files = _Files(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), files.changed, require_client_authentication=config.tls_client_ca_file is not None
    )
