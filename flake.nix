{
  description = "aigateway: a thread-per-core io_uring gateway for OpenAI- and Anthropic-style APIs";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    flake-utils.url = "github:numtide/flake-utils";
  };

  outputs = { self, nixpkgs, flake-utils }:
    flake-utils.lib.eachSystem [ "x86_64-linux" "aarch64-linux" ] (system:
      let
        pkgs = import nixpkgs { inherit system; };
        # Native dependencies: hyperscan for PII/secret scanning, cmake + clang for
        # BoringSSL (the `boring` crate) and bindgen.
        nativeBuildInputs = with pkgs; [ pkg-config cmake clang llvmPackages.libclang.lib perl go ];
        buildInputs = with pkgs; [ hyperscan ];
        common = {
          version = "0.1.0";
          src = ./.;
          cargoLock.lockFile = ./Cargo.lock;
          inherit nativeBuildInputs buildInputs;
          LIBCLANG_PATH = "${pkgs.llvmPackages.libclang.lib}/lib";
          # The end-to-end tests bind sockets and start processes: run them with `nix develop`.
          doCheck = false;
        };
      in
      {
        packages = {
          dataplane = pkgs.rustPlatform.buildRustPackage (common // {
            pname = "dataplane";
            cargoBuildFlags = [ "-p" "dataplane" ];
          });
          controlplane = pkgs.rustPlatform.buildRustPackage (common // {
            pname = "controlplane";
            cargoBuildFlags = [ "-p" "controlplane" ];
          });
          default = self.packages.${system}.dataplane;
        };

        devShells.default = pkgs.mkShell {
          inherit buildInputs;
          nativeBuildInputs = nativeBuildInputs ++ (with pkgs; [
            rustc cargo clippy rustfmt rust-analyzer cargo-nextest cargo-fuzz
            wrk nginx python3 sqlite testssl linuxPackages.perf
          ]);
          LIBCLANG_PATH = "${pkgs.llvmPackages.libclang.lib}/lib";
        };
      });
}
