"""7. grpcio client over TLS and mTLS to grpcgate; refused without a client cert; cert rotation on SIGHUP.
Run: ./venv/bin/python t7_tls.py"""
import datetime
import ipaddress
import os
import socket
import ssl
import sys

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID

from lib import Backend, Checker, Proxy, RUN_DIR, echo_pb2, echo_pb2_grpc, expect_error, gate_config, teardown

P, P2, ADMIN, B1 = 21220, 21221, 21229, 21222
TO = 5
CERT_DIR = os.path.join(RUN_DIR, "t7-certs")


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key, ca_cert, cn, server, rsa_key=False):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=10))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def pem_cert(c):
    return c.public_bytes(serialization.Encoding.PEM)


def pem_key(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write(name, data):
    p = os.path.join(CERT_DIR, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def gen():
    os.makedirs(CERT_DIR, exist_ok=True)
    ca_key, ca = make_ca("interop test CA")
    other_key, other = make_ca("other CA")
    sk, sc = make_leaf(ca_key, ca, "grpcgate server", True)
    sk2, sc2 = make_leaf(ca_key, ca, "grpcgate server rotated", True, rsa_key=True)
    ck, cc = make_leaf(ca_key, ca, "good client", False)
    ok_, oc = make_leaf(other_key, other, "rogue client", False)
    files = dict(ca=write("ca.crt", pem_cert(ca)), other_ca=write("other_ca.crt", pem_cert(other)),
                 server_crt=write("server.crt", pem_cert(sc) + pem_cert(ca)), server_key=write("server.key", pem_key(sk)),
                 server2_crt=pem_cert(sc2) + pem_cert(ca), server2_key=pem_key(sk2),
                 client_crt=write("client.crt", pem_cert(cc)), client_key=write("client.key", pem_key(ck)),
                 rogue_crt=write("rogue.crt", pem_cert(oc)), rogue_key=write("rogue.key", pem_key(ok_)))
    return files


# relative paths: resolved against the config file's directory (run/)
TLS = '[listeners.tls]\ncert = "t7-certs/server.crt"\nkey = "t7-certs/server.key"'
CONFIG = gate_config(ADMIN, [("tls", P, [{"cluster": "echo"}], TLS),
                             ("mtls", P2, [{"cluster": "echo"}], TLS + '\nclient_ca = "t7-certs/ca.crt"')],
                     [("echo", [B1], "")])


def rd(p):
    with open(p, "rb") as f:
        return f.read()


def call(port, creds, target=None):
    opts = []
    host = target or "127.0.0.1"
    ch = grpc.secure_channel(f"{host}:{port}", creds, options=opts)
    try:
        s = echo_pb2_grpc.EchoStub(ch)
        r = s.Unary(echo_pb2.EchoRequest(payload=b"tls"), timeout=TO)
        n = len(list(s.ServerStream(echo_pb2.EchoRequest(count=5), timeout=TO)))
        return r.payload == b"tls" and n == 5, f"payload={r.payload!r} stream={n}"
    finally:
        ch.close()


def expect_fail(port, creds=None):
    """A call over TLS with creds (plaintext without) must fail with UNAVAILABLE."""
    ch = grpc.secure_channel(f"127.0.0.1:{port}", creds) if creds else grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return expect_error(grpc.StatusCode.UNAVAILABLE, lambda: echo_pb2_grpc.EchoStub(ch).Unary(echo_pb2.EchoRequest(), timeout=TO))
    finally:
        ch.close()


def peer_cert_cn(port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=TO) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as t:
            cert = t.getpeercert()
            cn = dict(x[0] for x in cert["subject"])["commonName"]
            return cn, t.selected_alpn_protocol()


def main():
    c = Checker("t7_tls")
    f = gen()
    be = Backend(B1)
    px = Proxy("t7", CONFIG, P, ADMIN)
    with teardown(px, be), c.guard("t7 harness"):
        ca = rd(f["ca"])
        c.check("TLS: grpcio secure_channel (root = test CA) unary + stream",
                lambda: call(P, grpc.ssl_channel_credentials(root_certificates=ca)))
        c.check("TLS: via name localhost", lambda: call(P, grpc.ssl_channel_credentials(root_certificates=ca), "localhost"))
        c.check("TLS: client trusting another CA is refused (UNAVAILABLE)",
                lambda: expect_fail(P, grpc.ssl_channel_credentials(root_certificates=rd(f["other_ca"]))))

        c.check("plaintext client to TLS listener fails (UNAVAILABLE)", lambda: expect_fail(P))

        good = grpc.ssl_channel_credentials(root_certificates=ca, private_key=rd(f["client_key"]),
                                            certificate_chain=rd(f["client_crt"]))
        c.check("mTLS: client with a cert signed by client_ca: unary + stream", lambda: call(P2, good))
        c.check("mTLS: client without a cert is refused",
                lambda: expect_fail(P2, grpc.ssl_channel_credentials(root_certificates=ca)))
        rogue = grpc.ssl_channel_credentials(root_certificates=ca, private_key=rd(f["rogue_key"]),
                                             certificate_chain=rd(f["rogue_crt"]))
        c.check("mTLS: client with a cert from another CA is refused", lambda: expect_fail(P2, rogue))
        c.check("mTLS listener still works after refusals", lambda: call(P2, good))

        def alpn():
            cn, proto = peer_cert_cn(P, f["ca"])
            return cn == "grpcgate server" and proto == "h2", f"cn={cn} alpn={proto}"
        c.check("TLS listener negotiates ALPN h2", alpn)

        # rotation: same paths, new content, SIGHUP
        def rotate():
            ch = grpc.secure_channel(f"127.0.0.1:{P}", grpc.ssl_channel_credentials(root_certificates=ca))
            s = echo_pb2_grpc.EchoStub(ch)
            s.Unary(echo_pb2.EchoRequest(), timeout=TO)
            write("server.crt", f["server2_crt"])
            write("server.key", f["server2_key"])
            px.hup()
            ok = px.wait_metric("grpcgate_config_reloads_total", 1, 5, result="success")
            cn, _ = peer_cert_cn(P, f["ca"])
            still = s.Unary(echo_pb2.EchoRequest(payload=b"k"), timeout=TO).payload == b"k"
            ch.close()
            ok2, d = call(P, grpc.ssl_channel_credentials(root_certificates=ca))
            return ok and cn == "grpcgate server rotated" and still and ok2, f"reload={ok} new cn={cn} old conn works={still} new conn: {d}"
        c.check("SIGHUP rotates the certificate (new connections get it, old connection keeps working)", rotate)
    px.print_log(lambda l: "TLS" in l or "handshake" in l, limit=None, title="proxy log (TLS lines):")
    return c.summary()


if __name__ == "__main__":
    sys.exit(main())
