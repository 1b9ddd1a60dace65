using System.Net;

namespace QcowTier.Nbd;

/// <summary>Where an <see cref="NbdServer"/> listens and the limits it puts on clients.</summary>
public sealed class NbdServerOptions
{
    /// <summary>The largest read or write payload accepted, in bytes (32 MiB, as qemu-nbd).</summary>
    public const int DefaultMaxPayload = 32 << 20;

    /// <summary>A Unix socket to listen on; a stale socket file there is replaced and removed at shutdown. Takes precedence over <see cref="TcpEndPoint"/>.</summary>
    public string? UnixSocketPath { get; init; }

    /// <summary>A TCP address to listen on; without either this or <see cref="UnixSocketPath"/>, 127.0.0.1:10809. Port 0 picks a free port.</summary>
    public IPEndPoint? TcpEndPoint { get; init; }

    /// <summary>Connections served at once; further ones are closed as soon as they are accepted.</summary>
    public int MaxConnections { get; init; } = 64;

    /// <summary>How long a client may take from connecting to choosing an export; then it is disconnected.</summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>The largest read or write payload accepted (a larger write disconnects the client, a larger read fails with EINVAL).</summary>
    public int MaxPayload { get; init; } = DefaultMaxPayload;

    /// <summary>Requests one connection may have in progress at once; the server stops reading from it beyond that.</summary>
    public int MaxRequestsPerConnection { get; init; } = 128;

    /// <summary>
    /// Reads up to this many bytes run on the connection's own reader instead of the thread pool (default
    /// 16 KiB). For images in the page cache or on SSD that saves a thread hop per request, the larger
    /// part of a small read's cost. After a read that took long (it waited for a disk, e.g. an HDD tier)
    /// the next few hundred go to the thread pool anyway, so that a client's reads overlap; 0 sends every
    /// read there. Larger limits helped one streaming connection and hurt several (docs/BENCHMARKS.md).
    /// </summary>
    public int InlineReadLimit { get; init; } = 16 << 10;

    /// <summary>How often heat maps of exports with a <see cref="NbdExport.HeatFile"/> are saved while serving.</summary>
    public TimeSpan HeatSaveInterval { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>How long a graceful stop waits for clients to take their last replies before closing them anyway.</summary>
    public TimeSpan DrainTimeout { get; init; } = TimeSpan.FromSeconds(10);
}
