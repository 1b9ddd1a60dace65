using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;

namespace QcowTier.Nbd;

/// <summary>
/// An NBD server (fixed newstyle, structured replies, <c>base:allocation</c>) exporting QcowTier images
/// over a Unix socket or TCP, so that unmodified QEMU, qemu-img, nbdcopy, fio and the kernel can use
/// plain and tiered images.
/// </summary>
/// <remarks>
/// Every connection reads requests ahead and runs them concurrently on the thread pool; replies are
/// written by one sender per connection. Exports advertise NBD_FLAG_CAN_MULTI_CONN: all connections to an
/// export share one <see cref="QcowImage"/>, which is safe for concurrent use and whose flush covers every
/// completed write whichever connection made it. <see cref="StopAsync"/> stops accepting, finishes the
/// requests already read, sends their replies, flushes the images and saves the heat maps.
/// </remarks>
public sealed class NbdServer : IAsyncDisposable
{
    private readonly Dictionary<string, ExportState> _exports = new(StringComparer.Ordinal);
    private readonly ExportState[] _exportList;
    private readonly CancellationTokenSource _stopping = new();
    private readonly ConcurrentDictionary<NbdConnection, Task> _connections = new();
    private readonly TaskCompletionSource _stopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly object _gate = new();
    private Socket? _listener;
    private Task? _acceptLoop;
    private Task? _heatLoop;
    private Task? _stopTask;
    private bool _started;

    /// <summary>Creates a server for some exports; nothing listens before <see cref="Start"/>.</summary>
    /// <param name="exports">The exports, with distinct names.</param>
    /// <param name="options">Where to listen and the limits; defaults when null.</param>
    public NbdServer(IEnumerable<NbdExport> exports, NbdServerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(exports);
        Options = options ?? new NbdServerOptions();
        if (Options.MaxPayload < 1 << 20 || Options.MaxRequestsPerConnection < 1 || Options.MaxConnections < 1)
        {
            throw new ArgumentException("MaxPayload must be at least 1 MiB, MaxRequestsPerConnection and MaxConnections at least 1", nameof(options));
        }
        var list = new List<ExportState>();
        foreach (var e in exports)
        {
            ArgumentNullException.ThrowIfNull(e, nameof(exports));
            var state = new ExportState(e, Options.MaxPayload);
            if (!_exports.TryAdd(e.Name, state))
            {
                throw new ArgumentException($"two exports are named '{e.Name}'", nameof(exports));
            }
            list.Add(state);
        }
        if (list.Count == 0)
        {
            throw new ArgumentException("an NBD server needs at least one export", nameof(exports));
        }
        _exportList = [.. list];
        Exports = [.. list.Select(s => s.Export)];
    }

    /// <summary>The exports, in the order given.</summary>
    public IReadOnlyList<NbdExport> Exports { get; }

    /// <summary>Where the server listens (the actual port when port 0 was asked for); null before <see cref="Start"/>.</summary>
    public EndPoint? LocalEndPoint { get; private set; }

    /// <summary>Clients connected now.</summary>
    public int ConnectionCount => _connections.Count;

    /// <summary>Completes when the server has stopped (flushed its images and saved heat).</summary>
    public Task Completion => _stopped.Task;

    internal NbdServerOptions Options { get; }

    internal CancellationToken Stopping => _stopping.Token;

    internal IReadOnlyList<ExportState> ExportStates => _exportList;

    /// <summary>The NBD URI of an export (nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME), as qemu and libnbd take it.</summary>
    /// <param name="exportName">The export; the default export when empty.</param>
    /// <returns>The URI.</returns>
    public string GetUri(string exportName = "")
    {
        var name = Uri.EscapeDataString(exportName);
        return LocalEndPoint switch
        {
            UnixDomainSocketEndPoint => $"nbd+unix:///{name}?socket={Options.UnixSocketPath}",
            IPEndPoint ip => ip.AddressFamily == AddressFamily.InterNetworkV6 ? $"nbd://[{ip.Address}]:{ip.Port}/{name}" : $"nbd://{ip.Address}:{ip.Port}/{name}",
            _ => throw new InvalidOperationException("the server is not listening"),
        };
    }

    /// <summary>Binds the socket, starts heat recording and starts accepting clients.</summary>
    public void Start()
    {
        lock (_gate)
        {
            if (_started)
            {
                throw new InvalidOperationException("the server was already started");
            }
            _started = true;
        }
        var listener = Bind();
        try
        {
            foreach (var e in _exportList)
            {
                e.StartHeat();
            }
        }
        catch
        {
            listener.Dispose();
            foreach (var e in _exportList)
            {
                e.StopHeat(save: false);
            }
            throw;
        }
        _listener = listener;
        LocalEndPoint = listener.LocalEndPoint;
        _acceptLoop = AcceptLoopAsync(listener);
        if (_exportList.Any(e => e.Heat is not null))
        {
            _heatLoop = HeatLoopAsync();
        }
    }

    /// <summary>Starts (when not started), serves until <paramref name="cancellationToken"/> is cancelled, then stops gracefully.</summary>
    /// <param name="cancellationToken">Ends serving.</param>
    /// <returns>Completes when stopped.</returns>
    public async Task RunAsync(CancellationToken cancellationToken)
    {
        bool start;
        lock (_gate)
        {
            start = !_started;
        }
        if (start)
        {
            Start();
        }
        try
        {
            await Task.Delay(Timeout.Infinite, cancellationToken).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
        }
        await StopAsync().ConfigureAwait(false);
    }

    /// <summary>
    /// Stops gracefully: no new connections; requests already read are completed and answered; then
    /// connections are closed, every writable image is flushed and heat maps are saved. Idempotent.
    /// </summary>
    /// <returns>Completes when stopped.</returns>
    public Task StopAsync()
    {
        lock (_gate)
        {
            return _stopTask ??= StopCoreAsync();
        }
    }

    /// <summary>Same as <see cref="StopAsync"/>.</summary>
    /// <returns>Completes when stopped.</returns>
    public ValueTask DisposeAsync() => new(StopAsync());

    private async Task StopCoreAsync()
    {
        await Task.Yield();
        try
        {
            _stopping.Cancel();
            _listener?.Dispose();
            if (_acceptLoop is not null)
            {
                await _acceptLoop.ConfigureAwait(false);
            }
            var all = Task.WhenAll(_connections.Values);
            if (await Task.WhenAny(all, Task.Delay(Options.DrainTimeout)).ConfigureAwait(false) != all)
            {
                // Clients that stopped reading their replies: closing the sockets ends their pending sends.
                foreach (var c in _connections.Keys)
                {
                    c.Abort();
                }
            }
            await all.ConfigureAwait(false);
            if (_heatLoop is not null)
            {
                await _heatLoop.ConfigureAwait(false);
            }
            List<Exception>? errors = null;
            foreach (var e in _exportList)
            {
                try
                {
                    if (!e.ReadOnly)
                    {
                        e.Image.Flush();
                    }
                }
                catch (Exception ex) when (ex is IOException or ObjectDisposedException or InvalidOperationException)
                {
                    (errors ??= []).Add(ex);
                }
                try
                {
                    e.StopHeat(save: true);
                }
                catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
                {
                    (errors ??= []).Add(ex);
                }
            }
            if (Options.UnixSocketPath is { } path && LocalEndPoint is not null)
            {
                TryDeleteSocketFile(path);
            }
            if (errors is not null)
            {
                throw new AggregateException("stopping the NBD server failed to flush or save heat", errors);
            }
            _stopped.TrySetResult();
        }
        catch (Exception e)
        {
            _stopped.TrySetException(e);
            throw;
        }
    }

    private Socket Bind()
    {
        if (Options.UnixSocketPath is { } path)
        {
            // A socket file left by a killed server would make bind fail; anything else there is not ours to delete.
            if (File.Exists(path))
            {
                if (IsRegularFile(path))
                {
                    throw new IOException($"{path} exists and is not a socket");
                }
                File.Delete(path);
            }
            var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                s.Bind(new UnixDomainSocketEndPoint(path));
                s.Listen(128);
                return s;
            }
            catch
            {
                s.Dispose();
                throw;
            }
        }
        var ep = Options.TcpEndPoint ?? new IPEndPoint(IPAddress.Loopback, 10809);
        var tcp = new Socket(ep.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            tcp.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            tcp.Bind(ep);
            tcp.Listen(128);
            return tcp;
        }
        catch
        {
            tcp.Dispose();
            throw;
        }
    }

    private static bool IsRegularFile(string path)
    {
        // A socket cannot be opened as a file (ENXIO); a regular file can.
        try
        {
            using var f = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            return true;
        }
        catch (IOException)
        {
            return false;
        }
    }

    private static void TryDeleteSocketFile(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    private async Task AcceptLoopAsync(Socket listener)
    {
        var ct = _stopping.Token;
        while (!ct.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await listener.AcceptAsync(ct).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            catch (ObjectDisposedException)
            {
                return;
            }
            catch (SocketException) when (ct.IsCancellationRequested)
            {
                return;
            }
            catch (SocketException)
            {
                // EMFILE and friends: back off instead of spinning.
                await Task.Delay(50, CancellationToken.None).ConfigureAwait(false);
                continue;
            }
            if (_connections.Count >= Options.MaxConnections)
            {
                client.Dispose();
                continue;
            }
            var connection = new NbdConnection(this, client);
            var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _connections[connection] = tcs.Task;
            _ = RunConnectionAsync(connection, tcs);
        }
    }

    private async Task RunConnectionAsync(NbdConnection connection, TaskCompletionSource done)
    {
        try
        {
            await connection.RunAsync().ConfigureAwait(false);
        }
        finally
        {
            _connections.TryRemove(connection, out _);
            done.TrySetResult();
        }
    }

    private async Task HeatLoopAsync()
    {
        using var timer = new PeriodicTimer(Options.HeatSaveInterval);
        try
        {
            while (await timer.WaitForNextTickAsync(_stopping.Token).ConfigureAwait(false))
            {
                foreach (var e in _exportList)
                {
                    try
                    {
                        e.SaveHeat();
                    }
                    catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
                    {
                        // Retried at the next tick and at shutdown, where a failure is reported.
                    }
                }
            }
        }
        catch (OperationCanceledException)
        {
        }
    }

    internal ExportState? FindExport(string name) => _exports.GetValueOrDefault(name);
}
