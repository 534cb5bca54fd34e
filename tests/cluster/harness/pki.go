// Certificates and kubeconfigs: a self-signed CA, the apiserver's serving certificate, client
// certificates per control-plane identity and the service-account signing key pair.

package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

type clientIdentity struct {
	name     string // kubeconfig file name
	user     string // certificate CN: the user name the apiserver sees
	groups   []string
	certFile string
	keyFile  string
}

type pkiFiles struct {
	caFile, caKey           string
	servingCert, servingKey string
	adminCert, adminKey     string
	saPrivate, saPublic     string
	clients                 []clientIdentity
}

// writePKI makes every key and certificate the control plane needs, anew on each start.
func writePKI(dir string) (*pkiFiles, error) {
	files := &pkiFiles{
		caFile: filepath.Join(dir, "ca.crt"), caKey: filepath.Join(dir, "ca.key"),
		servingCert: filepath.Join(dir, "apiserver.crt"), servingKey: filepath.Join(dir, "apiserver.key"),
		saPrivate: filepath.Join(dir, "sa.key"), saPublic: filepath.Join(dir, "sa.pub"),
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kube-harness-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	if err := writeCert(files.caFile, caDER); err != nil {
		return nil, err
	}
	if err := writeECKey(files.caKey, caKey); err != nil {
		return nil, err
	}
	serial := int64(2)
	issue := func(certFile, keyFile string, subject pkix.Name, usage x509.ExtKeyUsage, dns []string, ips []net.IP) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		serial++
		template := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      subject,
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(365 * 24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
			DNSNames:     dns,
			IPAddresses:  ips,
		}
		der, err := x509.CreateCertificate(rand.Reader, template, caCert, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := writeCert(certFile, der); err != nil {
			return err
		}
		return writeECKey(keyFile, key)
	}
	if err := issue(files.servingCert, files.servingKey, pkix.Name{CommonName: "kube-apiserver"},
		x509.ExtKeyUsageServerAuth,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")}); err != nil {
		return nil, err
	}
	files.clients = []clientIdentity{
		{name: "admin", user: "kubernetes-admin", groups: []string{"system:masters"}},
		{name: "controller-manager", user: "system:kube-controller-manager"},
		{name: "scheduler", user: "system:kube-scheduler"},
		{name: "front-proxy-client", user: "front-proxy-client"},
	}
	for i := range files.clients {
		c := &files.clients[i]
		c.certFile = filepath.Join(dir, c.name+".crt")
		c.keyFile = filepath.Join(dir, c.name+".key")
		if err := issue(c.certFile, c.keyFile, pkix.Name{CommonName: c.user, Organization: c.groups},
			x509.ExtKeyUsageClientAuth, nil, nil); err != nil {
			return nil, err
		}
	}
	files.adminCert, files.adminKey = files.clients[0].certFile, files.clients[0].keyFile

	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	if err := writePEM(files.saPrivate, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey)); err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	if err := writePEM(files.saPublic, "PUBLIC KEY", pub); err != nil {
		return nil, err
	}
	return files, nil
}

func writeCert(path string, der []byte) error { return writePEM(path, "CERTIFICATE", der) }

func writeECKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der)
}

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}

func writeKubeconfig(path, server, caFile, certFile, keyFile string) error {
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: harness
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: harness
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: harness
  context: {cluster: harness, user: harness, namespace: default}
current-context: harness
`, server, caFile, certFile, keyFile)
	return os.WriteFile(path, []byte(content), 0o600)
}
