//! The service manager's readiness protocol: when `NOTIFY_SOCKET` is set (systemd `Type=notify`),
//! `READY=1` once serving, `RELOADING=1` then `READY=1` around a reload, `STOPPING=1` at the end.

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, state, "cannot notify the service manager");
    }
}

pub fn ready() {
    send("READY=1");
}

pub fn reloading() {
    send("RELOADING=1");
}

pub fn stopping() {
    send("STOPPING=1");
}
