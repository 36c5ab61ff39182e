//! Certificates made inside tests: a CA per test and leaf certificates it
//! signs, written as PEM files the way cert-manager mounts them
//! (`tls.crt`, `tls.key`, `ca.crt`), and rewritten in place to test
//! rotation.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test CA and the directory its files go to.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

/// One leaf's files.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Pki {
    /// A new CA named `name`, its certificate in `<dir>/<name>-ca.crt`.
    pub fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("create the PKI directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign the CA");
        let me = Self {
            ca,
            dir: dir.join(name),
        };
        std::fs::create_dir_all(&me.dir).expect("create the CA directory");
        std::fs::write(me.ca_file(), me.ca.pem()).expect("write the CA");
        me
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A leaf for `sans` (DNS names or IP addresses), usable as a server
    /// and as a client, written to `<dir>/<name>/{tls.crt,tls.key,ca.crt}`.
    pub fn issue(&self, name: &str, sans: &[&str]) -> Leaf {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("create the leaf directory");
        let leaf = Leaf {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        };
        self.write(&leaf, name, sans);
        std::fs::copy(self.ca_file(), &leaf.ca).expect("copy the CA");
        leaf
    }

    /// Writes a fresh certificate and key for `sans` over `leaf`'s files
    /// (a rotation), each file replaced atomically by a rename.
    pub fn write(&self, leaf: &Leaf, name: &str, sans: &[&str]) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("sign the leaf");
        replace(&leaf.key, key.serialize_pem().as_bytes());
        replace(&leaf.cert, cert.pem().as_bytes());
    }
}

fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write a PEM file");
    std::fs::rename(&tmp, path).expect("rename a PEM file into place");
}
