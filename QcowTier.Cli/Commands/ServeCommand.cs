using System.Globalization;
using System.Net;
using System.Runtime.InteropServices;
using QcowTier.Cli.Infrastructure;
using QcowTier.Nbd;

namespace QcowTier.Cli.Commands;

/// <summary>qcowtier serve: exports images over NBD (like qemu-nbd) until SIGINT or SIGTERM, recording heat if asked.</summary>
internal sealed class ServeCommand : Command
{
    public override string Name => "serve";

    public override string Synopsis => "serve [--socket PATH | --port N [--bind ADDR]] [-r] [-U] [--cache none|writeback] [--export-name NAME ...] [--record-heat FILE.heat ...] filename ...";

    public override string Help => """
        Serves qcow2 images (plain or tiered) over NBD until SIGINT or SIGTERM, then finishes the requests
        in progress, flushes the images, saves heat maps and exits 0. Clients: qemu (nbd+unix:///NAME?socket=PATH
        or nbd://HOST:PORT/NAME), qemu-img, qemu-io -f raw, nbdcopy, nbdinfo, fio's nbd engine, nbd-client.
          --socket PATH        listen on a Unix socket
          -p, --port N         listen on TCP port N (default 10809 when no --socket)
          -b, --bind ADDR      TCP address to bind (default 127.0.0.1)
          -r, --read-only      refuse writes (EPERM) and open the images read-only
          -x, --export-name N  the export name of each file, in order (default: "" for one file, else the file name)
          --record-heat FILE   record each file's reads and writes into a heat map (one per file, in order),
                               saved every --heat-interval seconds (default 60) and at exit
          -e, --shared N       clients served at once (default 64)
          --cache MODE         none (O_DIRECT) or writeback (default)
          --inline-read-limit N  reads up to N bytes run on the connection's thread (default 16384);
                               after a slow read (a disk, not the cache) the next ones overlap anyway
          -U, --force-share    open without QEMU's image locks

        """;

    public override int Run(IReadOnlyList<string> args, CliContext ctx)
    {
        var o = new OptionParser("p:b:rx:e:U", ("socket", true), ("cache", true), ("port", true), ("bind", true), ("read-only", false),
            ("export-name", true), ("record-heat", true), ("heat-interval", true), ("shared", true), ("force-share", false), ("inline-read-limit", true)).Parse(args);
        if (o.WantsHelp)
        {
            return PrintHelp(ctx);
        }
        var files = o.Operands;
        if (files.Count == 0)
        {
            throw new CliException("Expecting at least one image file name");
        }
        var names = o.GetAll("x").Concat(o.GetAll("export-name")).ToList();
        var heats = o.GetAll("record-heat").ToList();
        if (names.Count != 0 && names.Count != files.Count)
        {
            throw new CliException($"--export-name was given {names.Count} times for {files.Count} files");
        }
        if (heats.Count != 0 && heats.Count != files.Count)
        {
            throw new CliException($"--record-heat was given {heats.Count} times for {files.Count} files");
        }
        if (names.Count == 0)
        {
            names = files.Count == 1 ? [""] : [.. files.Select(Path.GetFileName).Select(n => n ?? "")];
        }
        var readOnly = o.Has("r") || o.Has("read-only");
        var cache = o.Get("cache") switch
        {
            null or "writeback" => QcowCacheMode.Writeback,
            "none" => QcowCacheMode.None,
            var t => throw new CliException($"Invalid cache option: {t}"),
        };
        var options = new NbdServerOptions
        {
            UnixSocketPath = o.Get("socket"),
            TcpEndPoint = o.Get("socket") is null ? ParseEndPoint(o) : null,
            MaxConnections = ParseInt(o.Get("e") ?? o.Get("shared"), "--shared", 64),
            HeatSaveInterval = TimeSpan.FromSeconds(ParseInt(o.Get("heat-interval"), "--heat-interval", 60)),
            InlineReadLimit = ParseInt(o.Get("inline-read-limit"), "--inline-read-limit", 16 << 10, max: NbdServerOptions.DefaultMaxPayload, min: 0),
        };
        if (o.Get("socket") is not null && (o.Has("p") || o.Has("port") || o.Has("b") || o.Has("bind")))
        {
            throw new CliException("--socket and --port/--bind are mutually exclusive");
        }

        var images = new List<QcowImage>();
        try
        {
            var exports = new List<NbdExport>();
            for (var i = 0; i < files.Count; i++)
            {
                var image = Open(files[i], readOnly, cache);
                images.Add(image);
                exports.Add(new NbdExport(names[i], image)
                {
                    ReadOnly = readOnly,
                    HeatFile = heats.Count > 0 ? heats[i] : null,
                    Description = Path.GetFileName(files[i]),
                });
            }
            return Serve(exports, options, ctx);
        }
        finally
        {
            foreach (var image in images)
            {
                image.Dispose();
            }
        }
    }

    private static int Serve(List<NbdExport> exports, NbdServerOptions options, CliContext ctx)
    {
        using var stop = new CancellationTokenSource();
        void OnSignal(PosixSignalContext c)
        {
            c.Cancel = true; // we exit ourselves, after draining and flushing
            stop.Cancel();
        }
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);
        var server = new NbdServer(exports, options);
        try
        {
            server.Start();
        }
        catch (Exception e) when (e is System.Net.Sockets.SocketException or IOException)
        {
            throw new CliException($"cannot listen on {options.UnixSocketPath ?? options.TcpEndPoint?.ToString()}: {e.Message}", e);
        }
        ctx.Out.WriteLine($"listening on {(options.UnixSocketPath is { } p ? "unix:" + p : server.LocalEndPoint)}");
        foreach (var e in exports)
        {
            ctx.Out.WriteLine($"export '{e.Name}': {e.Description}, {e.Image.Size} bytes, {(e.ReadOnly || e.Image.IsReadOnly ? "read-only" : "read-write")}{(e.HeatFile is { } h ? ", heat to " + h : "")}: {server.GetUri(e.Name)}");
        }
        ctx.Out.Flush();
        server.RunAsync(stop.Token).GetAwaiter().GetResult();
        ctx.Out.WriteLine("stopped: images flushed" + (exports.Any(e => e.HeatFile is not null) ? ", heat saved" : ""));
        return 0;
    }

    private static QcowImage Open(string path, bool readOnly, QcowCacheMode cache)
    {
        try
        {
            if (!QcowImage.IsQcow2(path))
            {
                throw new CliException($"Could not open '{path}': Image is not in qcow2 format");
            }
            return QcowImage.Open(path, new QcowOpenOptions
            {
                ReadOnly = readOnly,
                CacheMode = cache,
                ForceShare = Disks.DiskOpener.ForceShare,
            });
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidOperationException)
        {
            throw new CliException($"Could not open '{path}': {Disks.DiskOpener.Describe(e)}", e);
        }
    }

    private static IPEndPoint ParseEndPoint(ParsedOptions o)
    {
        var port = ParseInt(o.Get("p") ?? o.Get("port"), "--port", 10809, max: 65535, min: 0);
        var bind = o.Get("b") ?? o.Get("bind") ?? "127.0.0.1";
        if (!IPAddress.TryParse(bind, out var address))
        {
            throw new CliException($"--bind needs an IP address, not '{bind}'");
        }
        return new IPEndPoint(address, port);
    }

    private static int ParseInt(string? text, string option, int fallback, int max = int.MaxValue, int min = 1)
    {
        if (text is null)
        {
            return fallback;
        }
        if (!int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var v) || v < min || v > max)
        {
            throw new CliException($"{option} needs a number from {min} to {max}, not '{text}'");
        }
        return v;
    }
}
