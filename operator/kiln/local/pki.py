"""Certificates and keys of the local control plane: a CA, serving and client certificates, SA keys.

Everything is ECDSA P-256 and written as PEM into one folder. Files that already exist are kept,
so a restarted cluster keeps its identity and existing kubeconfigs stay valid.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate's subject: the user name (CN) and groups (O) Kubernetes sees."""

    file_stem: str
    user: str
    groups: tuple[str, ...] = ()


# The identities the components and the user authenticate as (RBAC bootstrap roles bind these).
ADMIN = ClientIdentity("admin", "kiln-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("controller-manager", "system:kube-controller-manager")
SCHEDULER = ClientIdentity("scheduler", "system:kube-scheduler")
# The real node (`kiln local up --real-node`): its kubelet (Node authorizer), kube-proxy (bound to
# system:node-proxier by the bootstrap roles) and CoreDNS (bound to a ClusterRole by kiln.local.realnode).
KUBELET = ClientIdentity("kubelet", "system:node:kiln-real-node", ("system:nodes",))
KUBE_PROXY = ClientIdentity("kube-proxy", "system:kube-proxy")
COREDNS = ClientIdentity("coredns", "system:kiln-coredns")
CLIENTS = (ADMIN, CONTROLLER_MANAGER, SCHEDULER, KUBELET, KUBE_PROXY, COREDNS)


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files in a PKI folder."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.directory / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.directory / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.directory / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.directory / "sa.pub"

    def client_cert(self, identity: ClientIdentity) -> Path:
        return self.directory / f"{identity.file_stem}.crt"

    def client_key(self, identity: ClientIdentity) -> Path:
        return self.directory / f"{identity.file_stem}.key"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an ECDSA key")
    return key


def _certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    usages: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def serving_names(service_ip: str) -> list[x509.GeneralName]:
    """Subject alternative names of the API server's serving certificate."""
    dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    dns.append("kubernetes.default.svc.cluster.local")
    ips = ["127.0.0.1", "::1", service_ip]
    return [*(x509.DNSName(name) for name in dns), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]


def ensure_pki(directory: Path, service_ip: str) -> Pki:
    """Create whatever is missing of the CA, serving/client certificates and SA keys; return paths."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln-local-ca")])
    if not (pki.ca_cert.exists() and pki.ca_key.exists()):
        ca_key = _new_key()
        _write_key(pki.ca_key, ca_key)
        _write_cert(pki.ca_cert, _certificate(ca_name, ca_key, ca_name, ca_key, ca=True, usages=[], sans=[]))
    ca_key = _read_key(pki.ca_key)
    if not pki.serving_cert.exists():
        key = _new_key()
        _write_key(pki.serving_key, key)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
        cert = _certificate(
            subject,
            key,
            ca_name,
            ca_key,
            ca=False,
            usages=[ExtendedKeyUsageOID.SERVER_AUTH],
            sans=serving_names(service_ip),
        )
        _write_cert(pki.serving_cert, cert)
    for identity in CLIENTS:
        if pki.client_cert(identity).exists():
            continue
        key = _new_key()
        _write_key(pki.client_key(identity), key)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in identity.groups]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, identity.user))
        cert = _certificate(
            x509.Name(attributes),
            key,
            ca_name,
            ca_key,
            ca=False,
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
            sans=[],
        )
        _write_cert(pki.client_cert(identity), cert)
    if not pki.sa_key.exists():
        sa_key = _new_key()
        _write_key(pki.sa_key, sa_key)
        pki.sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return pki
