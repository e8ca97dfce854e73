#!/bin/sh
# Test PKI for t10_tls.js: a CA, a server cert for 127.0.0.1/localhost, a client cert from the CA,
# and a client cert from an unrelated CA. Needs openssl. Certificates are valid for 30 days; t10_tls.js
# regenerates them on every run, so nothing generated here is ever committed.
# Usage: sh gen_certs.sh [DIR]       (default DIR: run/certs next to this script)
set -e
DIR="${1:-$(dirname "$0")/run/certs}"
mkdir -p "$DIR"
cd "$DIR"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=interop-ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 30 -extfile server.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=client" 2>/dev/null
printf "extendedKeyUsage=clientAuth\n" > client.ext
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 30 -extfile client.ext 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.crt -days 30 -subj "/CN=other-ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout rogue.key -out rogue.csr -subj "/CN=rogue" 2>/dev/null
openssl x509 -req -in rogue.csr -CA other-ca.crt -CAkey other-ca.key -CAcreateserial -out rogue.crt -days 30 -extfile client.ext 2>/dev/null
# PKCS#8 server key (rustls accepts PKCS#8/PKCS#1/SEC1)
openssl pkcs8 -topk8 -nocrypt -in server.key -out server.pk8.key
echo ok
