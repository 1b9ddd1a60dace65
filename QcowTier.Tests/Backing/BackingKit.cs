using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Backing;

/// <summary>Builds backing chains with qemu-img and qemu-io, and reads images through QEMU for comparison.</summary>
internal static class BackingKit
{
    public static void Img(params string[] args) => Qemu.Img(args).EnsureSuccess();

    public static void Io(string fmt, string path, params string[] commands)
    {
        var args = new List<string> { "-f", fmt };
        foreach (var c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(path);
        Qemu.Run("qemu-io", args).EnsureSuccess();
    }

    /// <summary>The guest content of an image as QEMU reads it (through its whole chain).</summary>
    public static byte[] QemuContent(TempDir dir, string path)
    {
        var raw = dir.File($"qemu-view-{Guid.NewGuid():N}.raw");
        Img("convert", "-O", "raw", path, raw);
        var bytes = File.ReadAllBytes(raw);
        File.Delete(raw);
        return bytes;
    }

    public static byte[] OurContent(string path, QcowOpenOptions? options = null)
    {
        using var image = QcowImage.Open(path, options ?? new QcowOpenOptions { ReadOnly = true });
        var buffer = new byte[image.Size];
        image.Read(0, buffer);
        return buffer;
    }

    public static async Task<byte[]> OurContentAsync(string path)
    {
        await using var image = QcowImage.Open(path, new QcowOpenOptions { ReadOnly = true });
        var buffer = new byte[image.Size];
        await image.ReadAsync(0, buffer);
        return buffer;
    }

    /// <summary>Hides the backing format extension (renames its type to an unknown one), so readers must probe the format.</summary>
    public static void StripBackingFormat(string path)
    {
        using var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        var head = new byte[4096];
        fs.ReadExactly(head);
        var pos = (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(100));
        while (pos + 8 <= head.Length)
        {
            var type = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(pos));
            var len = (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(pos + 4));
            if (type == 0)
            {
                break;
            }
            if (type == 0xe2792aca)
            {
                System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(head.AsSpan(pos), 0x0badf00d);
                fs.Position = pos;
                fs.Write(head, pos, 4);
                return;
            }
            pos += 8 + ((len + 7) & ~7);
        }
        throw new InvalidOperationException($"{path} has no backing format extension");
    }

    /// <summary>First differing offset, for a readable failure.</summary>
    public static void ShouldEqual(byte[] actual, byte[] expected, string because = "")
    {
        actual.Length.Should().Be(expected.Length, because);
        var same = actual.AsSpan().CommonPrefixLength(expected);
        same.Should().Be(actual.Length, $"the content differs at offset {same} {because}");
    }

    /// <summary>raw base (2 MiB) ← qcow2 mid (relative name, 3 MiB, 64k clusters) ← qcow2 top (absolute name, given size, 4k clusters).</summary>
    public static string ThreeLayers(TempDir dir, string topSize = "4M", string topCompat = "1.1")
    {
        var b = dir.File("base.raw");
        Img("create", "-q", "-f", "raw", b, "2M");
        Io("raw", b, "write -P 0x11 0 2M", "write -P 0x12 100k 30k");
        var mid = dir.File("mid.qcow2");
        Img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "3M");
        Io("qcow2", mid, "write -P 0x21 64k 64k", "write -P 0x22 1000k 7k", "write -z 256k 128k", "discard 512k 64k", "write -P 0x23 2100k 100k");
        var top = dir.File("top.qcow2");
        Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size=4096,compat={topCompat}", "-b", mid, "-F", "qcow2", top, topSize);
        Io("qcow2", top, "write -P 0x31 70k 5k", "write -z 600k 8k", "write -P 0x32 1400k 100k");
        if (topSize == "4M")
        {
            Io("qcow2", top, "write -P 0x33 2900k 200k", "write -P 0x34 1990k 100k");
        }
        return top;
    }
}
