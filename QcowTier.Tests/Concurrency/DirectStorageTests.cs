using System.Buffers.Binary;
using QcowTier.Storage;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Concurrency;

/// <summary>cache=none storage under concurrent writers: a read-modify-write of a partial block must never write stale bytes over a concurrent write.</summary>
public sealed class DirectStorageTests
{
    private static byte[] Tagged(int length, ulong tag)
    {
        var b = new byte[length];
        for (var i = 0; i < length; i += 8)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(i), tag);
        }
        return b;
    }

    [Theory]
    [InlineData(false)] // B writes whole aligned blocks (the unbuffered fast path)
    [InlineData(true)]  // B writes unaligned ranges that cover the block entirely (the bounce path)
    public void PartialBlockWritesDoNotUndoConcurrentWritesToTheSameBlock(bool bWritesUnaligned)
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }
        using var dir = new TempDir();
        var path = dir.File("direct.img");
        File.WriteAllBytes(path, new byte[64 << 10]);
        const int rounds = 4000;
        ulong lastB = 0;
        using (var storage = DirectFileStorage.Open(path, writable: true))
        {
            // A: sector 1 of block 1 (a partial block: read-modify-write).
            var a = new Thread(() =>
            {
                for (var i = 0; i < rounds; i++)
                {
                    storage.Write(4096 + 512, Tagged(512, 0xA000_0000UL + (ulong)i));
                }
            });
            // A 4 KiB-aligned buffer, so that aligned writes take the unbuffered fast path.
            var pinned = GC.AllocateArray<byte>(8192, pinned: true);
            Memory<byte> aligned;
            unsafe
            {
                fixed (byte* p = pinned)
                {
                    var skip = (int)((4096 - ((nint)p & 4095)) & 4095);
                    aligned = pinned.AsMemory(skip, 4096);
                }
            }
            // B: all of block 1 (and, unaligned, a bit of block 0 and block 2 too).
            var b = new Thread(() =>
            {
                for (var i = 0; i < rounds; i++)
                {
                    var tag = 0xB000_0000UL + (ulong)i;
                    if (bWritesUnaligned)
                    {
                        storage.Write(4096 - 512, Tagged(4096 + 1024, tag));
                    }
                    else
                    {
                        Tagged(4096, tag).CopyTo(aligned);
                        storage.Write(4096, aligned.Span);
                    }
                    Volatile.Write(ref lastB, tag);
                }
            });
            // An observer: B's tags only ever grow, so sector 0 of block 1 must never go back to an older one.
            var regressions = 0;
            var stop = 0;
            var observer = new Thread(() =>
            {
                var buf = new byte[4096];
                ulong seen = 0;
                while (Volatile.Read(ref stop) == 0)
                {
                    storage.Read(4096, buf);
                    var t = BinaryPrimitives.ReadUInt64LittleEndian(buf);
                    if (t < seen)
                    {
                        Interlocked.Increment(ref regressions);
                    }
                    seen = Math.Max(seen, t);
                }
            });
            a.Start();
            b.Start();
            observer.Start();
            a.Join(TimeSpan.FromSeconds(120)).Should().BeTrue("no deadlock");
            b.Join(TimeSpan.FromSeconds(120)).Should().BeTrue("no deadlock");
            Volatile.Write(ref stop, 1);
            observer.Join();
            regressions.Should().Be(0, "a read-modify-write of block 1 must never restore bytes older than a completed write");
        }
        var block = File.ReadAllBytes(path).AsSpan(4096, 4096);
        for (var sector = 0; sector < 8; sector++)
        {
            if (sector == 1)
            {
                continue; // A's and B's: either may win
            }
            BinaryPrimitives.ReadUInt64LittleEndian(block[(sector * 512)..]).Should().Be(lastB, $"sector {sector} holds B's last write; A's read-modify-write must not have restored an older one");
        }
    }
}
