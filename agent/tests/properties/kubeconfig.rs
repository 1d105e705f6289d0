//! Kubeconfig files (`kube_client::build`): whatever is in the file, the agent gets a
//! client or an error that names the file, never a panic.
use std::fs;

use hotplug_agent::{kube_client, sources::error_chain};
use proptest::{collection::vec, prelude::*, sample::select};

use crate::{check, ensure};

fn kubeconfig(server: &str, extra_cluster: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n{extra_cluster}\
         users:\n- name: u\n  user:\n{user}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n"
    )
}

fn hostile() -> impl Strategy<Value = Vec<u8>> {
    let server = select(
        &[
            "http://127.0.0.1:1",
            "https://127.0.0.1:6443",
            "ftp://127.0.0.1/",
            "127.0.0.1:6443",
            "http://[::1",
            "",
            "\"http://a b\"",
            "unix:///run/k8s.sock",
            "http://user:pass@host:99999",
        ][..],
    );
    let extra = select(
        &[
            "",
            "    insecure-skip-tls-verify: true\n",
            "    certificate-authority-data: bm90IGEgY2VydA==\n",
            "    certificate-authority-data: '%%%'\n",
            "    certificate-authority: /nonexistent/ca.pem\n",
            "    proxy-url: socks9://x\n",
            "    tls-server-name: 7\n",
        ][..],
    );
    let user = select(
        &[
            "    token: abc\n",
            "    username: a\n    password: b\n",
            "    client-certificate-data: Zm9v\n    client-key-data: YmFy\n",
            "    tokenFile: /nonexistent\n",
            "    exec:\n      command: /bin/false\n      apiVersion: client.authentication.k8s.io/v1\n",
            "    {}\n",
            "    - 1\n",
        ][..],
    );
    let valid = (server, extra, user).prop_map(|(s, e, u)| kubeconfig(s, e, u).into_bytes());
    prop_oneof![
        valid.clone(),
        super::mutated(valid, 5),
        vec(any::<u8>(), 0..200),
        select(
            &[
                "",
                "---",
                "[]",
                "clusters: 7",
                "apiVersion: v1\nkind: Config\n",
                "&a [*a]",
                "{"
            ][..]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

#[test]
fn any_kubeconfig_gives_a_client_or_an_error_that_names_the_file() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    check("kubeconfig_any", 400, hostile(), |bytes| {
        let dir = crate::scratch();
        let file = dir.path().join("kubeconfig");
        fs::write(&file, &bytes).expect("write");
        // Building never connects; requests would.
        match runtime.block_on(kube_client::build(Some(&file))) {
            Ok(_) => {}
            Err(e) => {
                let text = error_chain(&e);
                // The file, or (once it parsed) the server it names.
                let named = text.contains(&file.display().to_string()) || text.contains("://");
                ensure!(named, "{text:?} names neither the file nor the server");
            }
        }
        Ok(())
    });
}
